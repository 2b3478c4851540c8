"""Make ``import torchvision`` (and therefore ``import timm``) work on CPU-only torch.

The registry's only torchvision build matching torch 2.13 is a CUDA build. Its compiled
extension (``torchvision/_C.so``) cannot load without ``libtorch_cuda.so``; torchvision
notices that (its has-ops flag becomes False) but still registers fake kernels for
``torchvision::nms`` / ``torchvision::qnms`` at import, which raises
``RuntimeError: operator torchvision::nms does not exist``.

The fix is guarded: it only acts when torchvision is installed, not yet imported, and its
extension really fails to load. It then declares the two operator *schemas* (no kernels),
so torchvision's import-time registrations succeed. torchvision's compiled ops stay
unavailable, which is why agvm-ds ships its own detection ops in plain torch
(:mod:`agvm_ds.ops`); once torchvision is imported, :func:`after_torchvision_import` points
torchvision's ``nms`` / ``batched_nms`` / ``roi_align`` at them
(:mod:`agvm_ds.ops.torchvision_fallback`), so torchvision's own detectors train too. With a
working torchvision (CUDA torch, or a matching CPU build) nothing here acts.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the torch.library.Library alive for the life of the process
applied = False


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # not installed: nothing to fix
    for folder in spec.submodule_search_locations:
        for name in os.listdir(folder):
            if name.startswith("_C") and name.endswith((".so", ".pyd")):
                try:
                    torch.ops.load_library(os.path.join(folder, name))
                    return True
                except (OSError, RuntimeError):
                    return False
    return False


def ensure_torchvision_importable() -> bool:
    """Declare torchvision's operator schemas if its compiled extension cannot load.

    Returns True when the compat step acted, False when nothing was needed.
    """
    global _library, applied
    if applied or "torchvision" in sys.modules or _extension_loads():
        return applied
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op, schema in _SCHEMAS.items():
        try:
            getattr(torch.ops.torchvision, op)
        except (AttributeError, RuntimeError):
            lib.define(schema)
    _library = lib
    applied = True
    return True


class _AfterTorchvisionImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: lets torchvision import as usual, then runs
    :func:`agvm_ds.ops.torchvision_fallback.install` (which acts only without compiled ops)."""

    _finding = False  # set while the ordinary finders look torchvision up (no recursion)

    def find_spec(self, name, path, target=None):
        if name != "torchvision" or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            # only now: a mere find_spec("torchvision") (an availability check) keeps the hook
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _run_installer()

        spec.loader.exec_module = exec_then_install
        return spec


#: what runs once torchvision is imported (agvm_ds/__init__.py hands in the ops fallback; this
#: ground-floor module never imports agvm_ds.ops, which imports it)
_installer = None


def _run_installer() -> None:
    if _installer is not None:
        _installer()


def after_torchvision_import(installer) -> None:
    """Run ``installer`` (:func:`agvm_ds.ops.torchvision_fallback.install`) now if torchvision
    is already imported, else right after its first import. Only where its extension failed
    to load (``applied``) is an import hook placed: elsewhere nothing is hooked at all."""
    global _installer
    _installer = installer
    if "torchvision.ops" in sys.modules:
        _run_installer()
    elif applied and not any(isinstance(f, _AfterTorchvisionImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTorchvisionImport())


ensure_torchvision_importable()
