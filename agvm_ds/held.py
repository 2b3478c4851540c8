"""The gradients DeepSpeed holds, read for the self-check's reference (:mod:`agvm_ds.selfcheck`).

AGVM's statistics are a function of two vectors per step: DeepSpeed's averaged gradient
``G`` at the accumulation boundary and one more vector ``S`` (docs/agvm.md) — for ``micro``
the averaged running sum after the first ⌊A/2⌋ micro-batches, for ``ranks`` each rank's own
gradient of the step before reduction. In bf16 or fp16 both differ from a float64 sum of
the micro-batch gradients by DeepSpeed's rounding (2^-9 per bf16 sum), which would force a
loose tolerance on the check. So the reference reads the tensors DeepSpeed itself holds at
those points, in float64, and the check compares AGVM against a float64 computation on
*them*; a separate check bounds their distance from a plain all-reduce.

Written from DeepSpeed 0.19.8's source, independently of :mod:`agvm_ds.core` (which reads
the same places for its own purposes): a slip in the package's adapters cannot hide here.
Every function returns ``name → flat float64 tensor`` (full parameters, on the device) and
runs collectives on every rank (call it on all of them).
"""

from __future__ import annotations

import torch

from agvm_ds import collectives


def _stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def _is_bf16_optimizer(zo) -> bool:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return isinstance(zo, BF16_Optimizer)


def local_sums(engine, names, at_boundary: bool) -> dict | None:
    """This rank's own, not yet reduced running sum of the step's gradients, or None where
    DeepSpeed does not keep one (ZeRO-2/3 reduce every micro-step; ZeRO-1 with
    ``overlap_comm`` reduces inside the boundary micro-step's hooks). Stage 0: ``p.grad``;
    ZeRO-1: the gradient attribute the ZeRO optimizer accumulates into; BF16_Optimizer
    (bf16 weights, fp32 accumulation): its full fp32 gradient buffers."""
    zo, out = engine.optimizer, {}
    params = dict(engine.module.named_parameters())
    if _is_bf16_optimizer(zo):
        where = {id(p): (gi, j) for gi, group in enumerate(zo.bf16_groups) for j, p in enumerate(group)}
        for n in names:
            gi, j = where[id(params[n])]
            out[n] = zo.fp32_groups_gradients[gi][j]
    elif _stage(engine) == 0:
        out = {n: params[n].grad for n in names}
    elif _stage(engine) == 1:
        if at_boundary and getattr(zo, "overlap_comm", False):
            return None
        out = {n: zo.get_param_gradient_attribute(params[n]) for n in names}
    else:
        return None
    return {n: (torch.zeros(params[n].numel(), dtype=torch.float64, device=params[n].device) if g is None
                else g.detach().reshape(-1).to(torch.float64, copy=True)) for n, g in out.items()}


def _cut(full: torch.Tensor, params, offsets) -> dict:
    return {id(p): full[int(o):int(o) + p.numel()] for p, o in zip(params, offsets)}


def _zero2_partition(zo, gi: int) -> torch.Tensor:
    """ZeRO-2 between boundaries: this rank's partition of group ``gi``'s reduced running sum."""
    ps = int(zo.partition_size[gi])
    compact = getattr(zo, "_use_compact_grad_partition_buffer", lambda i: False)(gi)
    if compact:  # bf16 weights, fp32 accumulation: one fp32 flat partition on the device
        flat = getattr(zo.averaged_gradients.get(gi), "flat_partition", None)
        return torch.zeros(ps) if flat is None else flat.reshape(-1).float()
    if getattr(zo, "cpu_offload", False):
        # the reduced running sum of each parameter this rank owns part of, in host memory;
        # grad_position = (group, offset in the parameter's buffer, offset in the partition, length)
        part = torch.zeros(ps)
        held = getattr(zo, "accumulated_grads_in_cpu", {})
        for p in zo.params_in_partition[gi]:
            pid = zo.get_param_id(p)
            if pid in held:
                _, src, dst, n = zo.grad_position[pid]
                buf = held[pid].reshape(-1)
                part[dst:dst + n] = (buf if buf.numel() == n else buf[src:src + n]).float().cpu()
        return part
    if zo.all_grad_tensors.get(gi) is None:
        return torch.zeros(ps)
    parts = zo.get_flat_partition(zo.params_in_partition[gi], zo.first_offset[gi], ps, dtype=torch.float32,
                                  device=_device(), param_group_idx=gi,
                                  return_tensor_list=True)
    return torch.cat([t.reshape(-1).float() for t in parts])


def _zero3_running(zo, p) -> torch.Tensor:
    """ZeRO-3 between boundaries: the full reduced running sum of ``p``. Without offload
    DeepSpeed's ``get_fp32_grad_for_param`` gathers it; with ``offload_optimizer`` that helper
    reads the host fp32 gradient, filled only at the boundary, while the running sum stays in
    the device partition buffer (read by its mangled name)."""
    if not getattr(zo, "offload_optimizer", False):
        return zo.get_fp32_grad_for_param(p).reshape(-1)
    buf = getattr(zo, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition").get(p.ds_id)
    part = torch.zeros(int(p.ds_tensor.ds_numel)) if buf is None else buf.reshape(-1).float()
    return torch.cat(collectives.all_gather(part.to(_device()).contiguous()))[: int(p.ds_numel)]


def _device():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def running_sum(engine, names, world: int) -> dict:
    """DeepSpeed's averaged running sum of the micro-batches so far (between boundaries):
    what ZeRO-2/3 already reduced, or the mean over ranks of every rank's local sum
    (stage 0, ZeRO-1, BF16_Optimizer), taken here in float64."""
    local = local_sums(engine, names, at_boundary=False)
    if local is not None:
        flat = torch.cat([local[n] for n in names])
        flat = collectives.all_reduce_sum(flat) / world
        return dict(zip(names, flat.split([local[n].numel() for n in names])))
    zo = engine.optimizer
    params = dict(engine.module.named_parameters())
    if _stage(engine) == 3:
        return {n: _zero3_running(zo, params[n]).double() for n in names}
    by_id = {}
    for gi, group in enumerate(zo.round_robin_bit16_groups):
        part = _zero2_partition(zo, gi).to(_device())
        full = torch.cat(collectives.all_gather(part, group=zo.real_dp_process_group[gi]))
        by_id.update(_cut(full, group, zo.round_robin_bit16_offsets[gi]))
    return {n: by_id[id(params[n])].double() for n in names}


def averaged_grads(engine, names) -> dict:
    """DeepSpeed's averaged gradient of every parameter (float64, flat), at the boundary.

    DeepSpeed's own helpers serve where they are right: ``get_fp32_grad_for_param`` at ZeRO-3,
    ``safe_get_full_grad`` at stage 0, for BF16_Optimizer and under offload. At ZeRO-1/2
    (DeepSpeedZeroOptimizer) ``safe_get_full_grad`` maps fragments in the wrong order when
    ``round_robin_gradients`` is on (measured with deepspeed 0.19.8: values of other
    parameters, or a size-mismatch error), so there each rank's ``averaged_gradients``
    partition is all-gathered and cut by ``round_robin_bit16_groups`` / ``_offsets``."""
    from deepspeed.utils import safe_get_full_grad

    zo = engine.optimizer
    flat = {}
    if hasattr(zo, "round_robin_bit16_groups"):
        flat = _zero12_grads(zo)
    out = {}
    for n, p in engine.module.named_parameters():
        if n not in names:
            continue
        if id(p) in flat:
            g = flat[id(p)]
        else:
            g = p._z3_optimizer.get_fp32_grad_for_param(p) if hasattr(p, "ds_id") else safe_get_full_grad(p)
        out[n] = None if g is None else g.detach().double().reshape(-1)
    return out


def _zero12_grads(zo) -> dict:
    out = {}
    for gi, params in enumerate(zo.round_robin_bit16_groups):
        ps = int(zo.partition_size[gi])
        if getattr(zo, "cpu_offload", False):  # offload: reduced straight into the fp32 partition's grad
            held = zo.single_partition_of_fp32_groups[gi].grad
            held = None if held is None else [held]
        else:
            held = zo.averaged_gradients.get(gi) if isinstance(zo.averaged_gradients, dict) else zo.averaged_gradients[gi]
        if held is None:
            continue
        buf = getattr(held, "flat_partition", None)
        part = buf.reshape(-1).float() if buf is not None else torch.cat([t.reshape(-1).float() for t in held])
        part = part.to(_device())  # offload keeps it on the CPU; NCCL needs the device
        if part.numel() != ps:
            raise RuntimeError(f"selfcheck: ZeRO partition {gi} holds {part.numel()} elements, expected {ps}")
        full = torch.cat(collectives.all_gather(part, group=zo.real_dp_process_group[gi]))
        out.update(_cut(full, params, zo.round_robin_bit16_offsets[gi]))
    return out
