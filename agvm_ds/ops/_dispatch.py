"""Which detection ops run on torchvision's compiled kernels: decided once per op and device.

torchvision's ``nms`` / ``roi_align`` kernels are much faster on a GPU than the pure-torch
versions in :mod:`agvm_ds.ops`, but they only exist where torchvision's extension loads (a
CUDA torch with a matching torchvision, or a matching CPU build). The first call of an op on
a device type decides: the extension must have loaded, the op must have a kernel for that
dispatch key, and a call on a tiny tensor must succeed (which also catches a build without
code for this GPU's architecture). The answer is cached for the life of the process and
logged once on ``agvm_ds.ops`` at INFO, e.g. ``nms on cuda: torchvision's compiled kernel``.

``AGVM_DS_TORCHVISION_OPS=0`` forces the pure-torch versions everywhere (benchmarks, or to
rule the kernels out while debugging).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch

__all__ = ["compiled_op", "active_paths"]

log = logging.getLogger("agvm_ds.ops")

# (op name, device type) -> the torch.ops callable, or None for "use the pure-torch version"
_cache: dict[tuple[str, str], Optional[Callable]] = {}
_reasons: dict[tuple[str, str], str] = {}

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "xpu": "XPU", "mps": "MPS"}


def _probe_args(name: str, device: torch.device) -> tuple:
    if name == "nms":
        return (torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 1.9]], device=device),
                torch.tensor([1.0, 0.5], device=device), 0.5)
    if name == "roi_align":
        return (torch.ones(1, 1, 2, 2, device=device),
                torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]], device=device), 1.0, 1, 1, 1, True)
    raise ValueError(f"no probe for op {name!r}")


def _load(name: str, device_type: str) -> tuple[Optional[Callable], str]:
    """The compiled op if it really runs on ``device_type``, else None; and why."""
    if os.environ.get("AGVM_DS_TORCHVISION_OPS", "1") == "0":
        return None, "AGVM_DS_TORCHVISION_OPS=0"
    try:
        import agvm_ds._compat  # noqa: F401  (torchvision must import even on CPU-only torch)
        import torchvision  # noqa: F401  (loading it registers torch.ops.torchvision.*)
        from torchvision.extension import _has_ops
    except Exception as err:  # noqa: BLE001 - any failure means "not available"
        return None, f"torchvision is not importable ({type(err).__name__}: {err})"
    if not _has_ops():
        return None, "torchvision's compiled extension did not load"
    try:
        op = getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return None, f"torchvision has no {name} op"
    key = _DISPATCH_KEYS.get(device_type)
    try:
        if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(f"torchvision::{name}", key):
            return None, f"no {device_type} kernel registered"
    except (AttributeError, RuntimeError):
        pass  # private API gone in some torch: the probe call below decides alone
    try:
        op(*_probe_args(name, torch.device(device_type)))
    except Exception as err:  # noqa: BLE001 - e.g. "no kernel image is available for execution"
        return None, f"the kernel failed on a tiny input ({type(err).__name__}: {str(err)[:120]})"
    return op, "ok"


def compiled_op(name: str, device: torch.device) -> Optional[Callable]:
    """torchvision's compiled ``name`` op for tensors on ``device``, or None (use ours)."""
    key = (name, device.type)
    if key not in _cache:
        op, why = _load(*key)
        _cache[key], _reasons[key] = op, why
        if op is not None:
            log.info("agvm_ds.ops: %s on %s: torchvision's compiled kernel", name, device.type)
        else:
            log.info("agvm_ds.ops: %s on %s: pure-torch implementation (%s)", name, device.type, why)
    return _cache[key]


def active_paths(device: torch.device | str) -> dict[str, str]:
    """``{"nms": "torchvision"|"torch", "roi_align": ...}`` on ``device`` (probes if needed)."""
    device = torch.device(device)
    return {name: "torchvision" if compiled_op(name, device) is not None else "torch"
            for name in ("nms", "roi_align")}
