"""Make ``import torchvision`` (and therefore ``import timm``) work on CPU-only torch.

The registry's only torchvision build matching torch 2.13 is a CUDA build. Its compiled
extension (``torchvision/_C.so``) cannot load without ``libtorch_cuda.so``; torchvision
notices that (its has-ops flag becomes False) but still registers fake kernels for
``torchvision::nms`` / ``torchvision::qnms`` at import, which raises
``RuntimeError: operator torchvision::nms does not exist``.

The fix is guarded: it only acts when torchvision is installed, not yet imported, and its
extension really fails to load. It then declares the two operator *schemas* (no kernels),
so torchvision's import-time registrations succeed. torchvision's compiled ops stay
unavailable (``torchvision.ops.nms`` still refuses), which is why agvm-ds ships its own
detection ops in plain torch (:mod:`agvm_ds.ops`). With a working torchvision (CUDA torch,
or a matching CPU build) nothing here runs.
"""

from __future__ import annotations

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


ensure_torchvision_importable()
