"""ZeRO's flat gradient/optimizer partitions, read from DeepSpeed 0.19's optimizers.

DeepSpeed packs a param group's tensors back to back into one flat buffer and gives rank
``r`` the elements ``[r·ps, (r + 1)·ps)``. :func:`flat_cut` is that cut, written once: the
per-stage adapters (:mod:`agvm_ds.core.adapters`), exact layer-wise Lamb/Lars
(:mod:`agvm_ds.optim.layerwise`) and elastic resume (:mod:`agvm_ds.train.elastic`) all
derive their maps from it. This module imports nothing from agvm_ds, so both rooms can
use it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def flat_cut(offsets, sizes, part: int, rank: int) -> list[tuple[int, int, int, int]]:
    """The runs of a flat buffer that rank ``rank`` owns: tensor ``j`` of ``sizes[j]`` elements
    starts at ``offsets[j]``; the rank owns ``[rank·part, (rank + 1)·part)``. Returns
    ``(j, start in the tensor, start in the rank's partition, length)`` in buffer order."""
    runs = []
    lo_rank, hi_rank = rank * part, (rank + 1) * part
    for j, (off, n) in enumerate(zip(offsets, sizes)):
        lo, hi = max(off, lo_rank), min(off + n, hi_rank)
        if lo < hi:
            runs.append((j, lo - off, lo - lo_rank, hi - lo))
    return runs


def packed_offsets(sizes) -> list[int]:
    """Where each tensor starts when ``sizes`` are packed back to back."""
    offsets, at = [], 0
    for n in sizes:
        offsets.append(at)
        at += n
    return offsets


@dataclass(frozen=True)
class FlatPartition:
    """One flat fp32 tensor the engine hands its base optimizer's ``step()``: this rank's
    ``runs`` ``(param index, param start, flat start, length)`` of ``params`` (the same list,
    in the same order, on every rank of ``group``); elements no run covers are padding.
    ``distributed`` is False where the flat tensor holds whole parameters."""

    flat: torch.Tensor
    params: tuple
    runs: tuple
    group: object = None
    distributed: bool = True


def flat_partitions(engine) -> list[FlatPartition]:
    """Every flat tensor this engine's optimizer steps, and which parameter elements it holds
    (empty at stage 0 with whole parameters):

    * stage 0 fp32, and fp16/bf16 through ``FP16_UnfusedOptimizer``: whole (fp32 copies of)
      parameters, nothing listed; ``FP16_Optimizer`` (fused, FusedAdam only): ``fp32_groups_flat[i]``
      holds whole params of ``fp16_groups[i]`` back to back (not distributed);
    * ZeRO-1/2: ``single_partition_of_fp32_groups[i]`` is ``[r·ps, (r+1)·ps)`` of group ``i``'s
      flat buffer (``round_robin_bit16_groups[i]`` at ``round_robin_bit16_offsets[i]``,
      ``ps = partition_size[i]``, padding at the end), one ``step()`` per group;
    * BF16_Optimizer: ``fp32_groups_flat_partition[i]``, the same cut of ``bf16_groups[i]``
      packed back to back (aligned padding at the end), all groups in one ``step()``;
    * ZeRO-3: sub-group ``j``'s ``fp32_partitioned_groups_flat[j]`` is the concatenation of
      its params' (``fp16_groups[j]``) partitions, ``ds_tensor.ds_numel = ceil(numel / N)``
      each, rank ``r`` holding elements ``[r·part, (r+1)·part)`` (the last rank padded), one
      ``step()`` per sub-group.
    """
    import torch.distributed as tdist
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    zo = engine.optimizer
    stage = int(engine.zero_optimization_stage())

    def rank_in(group) -> int:
        return tdist.get_rank(group) if tdist.is_initialized() else 0

    def packed(params):
        return packed_offsets([p.numel() for p in params])

    def cut(flat, params, offsets, ps, group) -> FlatPartition:
        runs = flat_cut(offsets, [p.numel() for p in params], ps, rank_in(group))
        return FlatPartition(flat, tuple(params), tuple(runs), group)

    out = []
    if isinstance(zo, BF16_Optimizer):
        for i, flat in enumerate(zo.fp32_groups_flat_partition):
            out.append(cut(flat, zo.bf16_groups[i], packed(zo.bf16_groups[i]), flat.numel(),
                           zo.real_dp_process_group[i]))
    elif isinstance(zo, FP16_Optimizer):
        for i, flat in enumerate(zo.fp32_groups_flat):
            params = zo.fp16_groups[i]
            runs = tuple((j, 0, off, p.numel()) for j, (p, off) in enumerate(zip(params, packed(params))))
            out.append(FlatPartition(flat, tuple(params), runs, None, distributed=False))
    elif stage in (1, 2):
        for i, flat in enumerate(zo.single_partition_of_fp32_groups):
            out.append(cut(flat, zo.round_robin_bit16_groups[i], [int(o) for o in zo.round_robin_bit16_offsets[i]],
                           int(zo.partition_size[i]), zo.real_dp_process_group[i]))
    elif stage == 3:
        for j, flat in enumerate(zo.fp32_partitioned_groups_flat):
            params = zo.fp16_groups[j]
            group = zo.sub_group_process_groups[j]
            if flat.numel() == 0 and params:
                raise ValueError("flat partitions: ZeRO-3 with NVMe-swapped optimizer state is not supported")
            r = rank_in(group)
            runs, at = [], 0
            for k, p in enumerate(params):
                part = int(p.ds_tensor.ds_numel)
                valid = max(0, min(int(p.ds_numel) - r * part, part))
                if valid:
                    runs.append((k, r * part, at, valid))
                at += part
            if at != flat.numel():
                raise ValueError(f"ZeRO-3 sub-group {j}: partitions hold {at} elements, its fp32 flat {flat.numel()}")
            out.append(FlatPartition(flat, tuple(params), tuple(runs), group))
    return out
