"""The package's collectives outside the AGVM core, on the accelerator's device.

NCCL takes only tensors on the rank's own GPU; gloo takes CPU tensors too, so code that
all-reduces a bare ``torch.tensor(...)`` passes every CPU test and crashes the first step of
a multi-GPU run. Every tensor collective of the training loop, the models and evaluation
therefore goes through this module, which moves its tensor to
``deepspeed.accelerator.get_accelerator()``'s current device first (a no-op when it is
there already) and hands the result back on that device. Object collectives (``gather_objects``,
``broadcast_object``) are for Python objects only (COCO results, error messages).

The AGVM core issues its own collectives, on tensors it allocates on the accelerator's
device: ``core/controller.py`` (the statistics all-reduce, the stage-0 finiteness flag) and
``core/reducer.py`` (the ``ranks`` estimator's signed stream). ``tests/test_collectives.py``
walks the package's source and fails when a ``torch.distributed`` / ``deepspeed.comm``
collective is called anywhere else.

Every function is a no-op (or the identity) when no process group is initialized or the
world has one rank, so single-process code and tests need no special casing.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def device() -> torch.device:
    """The device every tensor collective runs on (the rank's GPU under NCCL, CPU on gloo)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _on_device(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is already on the collective device and contiguous, else a copy
    there (collectives work in place, so the caller must use the returned tensor)."""
    d = device()
    if t.device == d and t.is_contiguous():
        return t
    return t.detach().to(device=d).contiguous()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of ``t`` (a new tensor unless ``t`` was already on the device, in which
    case it is reduced in place); on the collective device."""
    if world() == 1:
        return t
    out = _on_device(t)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_sum_group(t: torch.Tensor, group=None) -> torch.Tensor:
    """Σ over the ranks of ``group`` (``None``: the default group, e.g. DeepSpeed's
    data-parallel group when it spans the world); like :func:`all_reduce_sum` otherwise."""
    if world() == 1 or (group is not None and dist.get_world_size(group) == 1):
        return t
    out = _on_device(t)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a floating tensor; see :func:`all_reduce_sum`."""
    n = world()
    if n == 1:
        return t
    return all_reduce_sum(t).div_(n)


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape on every rank of ``group``; ``None``: the default
    group), in rank order, on the collective device."""
    n = world() if group is None else dist.get_world_size(group)
    if n == 1:
        return [t]
    src = _on_device(t)
    parts = [torch.empty_like(src) for _ in range(n)]
    dist.all_gather(parts, src, group=group)
    return parts


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def gather_objects(obj: Any, dst: int = 0) -> Optional[list]:
    """Every rank's ``obj`` on ``dst`` (a list in rank order), ``None`` elsewhere."""
    n = world()
    if n == 1:
        return [obj]
    out = [None] * n if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``src``'s ``obj`` on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
