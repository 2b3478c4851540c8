"""Whole-tensor norms for layer-wise optimizers (LAMB, LARS) whatever tensor they step.

A layer-wise optimizer scales each parameter's update by a *trust ratio* computed from the
norms of the whole parameter (‖w‖, ‖update‖ or ‖g‖). Under ZeRO the base optimizer is not
handed the parameters but one flat fp32 partition per call — ZeRO-1/2 one per param group,
ZeRO-3 one per sub-group, BF16_Optimizer one per group in a single call — in which each
parameter is a contiguous run, cut at the partition borders, possibly followed by padding.

A :class:`SegmentMap` describes such a flat tensor: runs ``(tensor_index, start, length)``
covering it in order, ``tensor_index`` in ``[0, num_tensors)`` numbering the parameters that
every rank's partition of the same call is cut from (identical on all ranks), ``-1`` for
padding. With ``K`` statistics per tensor the optimizer then, per ``step()`` call:

1. splits each statistic's flat tensor into its runs (``torch.split``: views, one call) and
   takes all run norms in one ``torch._foreach_norm``; squares them in float64;
2. adds the runs' squared norms into a ``[slots, K]`` float64 table (``index_add_``, one
   slot per (stepped tensor, tensor_index), one discard slot for padding);
3. sums the table over the data-parallel group in ONE all-reduce (only when the maps are
   ``distributed``, i.e. other ranks hold the other parts; stage 0 steps whole tensors and
   issues none);
4. turns the table into one factor per slot (the optimizer's trust ratio) and applies it
   run by run with foreach ops on the same views (no per-element index tensor: the only
   index is one int64 per run).

A stepped tensor without a map is one whole tensor (one run). Once a layout is attached
for ZeRO ≥ 1, a stepped tensor without a map raises instead: its norm would silently be the
norm of a slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch


@dataclass(frozen=True)
class SegmentMap:
    """Runs ``(tensor_index, start, length)`` covering a flat tensor of ``numel`` elements in
    order (``tensor_index == -1``: padding, discarded). ``group``: the process group whose
    ranks hold the other parts of the same tensors (``None``: the default group);
    ``distributed=False`` when this flat tensor holds whole tensors (no collective)."""

    runs: tuple[tuple[int, int, int], ...]
    num_tensors: int
    group: Any = None
    distributed: bool = True
    #: ``id`` of the model parameter behind each tensor index (for checks and reports).
    sources: tuple[int, ...] = field(default=(), compare=False)

    def __post_init__(self):
        at = 0
        for idx, start, length in self.runs:
            if start != at or length <= 0:
                raise ValueError(f"segment map: run ({idx}, {start}, {length}) does not start at {at} "
                                 "or is empty (runs must cover the tensor in order)")
            if not -1 <= idx < self.num_tensors:
                raise ValueError(f"segment map: tensor index {idx} outside [-1, {self.num_tensors})")
            at += length

    @property
    def numel(self) -> int:
        return sum(r[2] for r in self.runs)

    @classmethod
    def from_pieces(cls, numel: int, pieces: Sequence[tuple[int, int, int]], num_tensors: int,
                    group: Any = None, distributed: bool = True, sources: tuple = ()) -> "SegmentMap":
        """Build from ``(tensor_index, start, length)`` pieces in any order that do not
        overlap; every gap (and the tail up to ``numel``) becomes padding."""
        runs, at = [], 0
        for idx, start, length in sorted((p for p in pieces if p[2] > 0), key=lambda p: p[1]):
            if start < at:
                raise ValueError(f"segment map: piece at {start} overlaps the previous one (ends at {at})")
            if start > at:
                runs.append((-1, at, start - at))
            runs.append((idx, start, length))
            at = start + length
        if at > numel:
            raise ValueError(f"segment map: pieces end at {at}, past the tensor's {numel} elements")
        if at < numel:
            runs.append((-1, at, numel - at))
        return cls(tuple(runs), num_tensors, group, distributed, tuple(sources))


class CallPlan:
    """The runs of one ``step()`` call's stepped tensors, in order; cached per tensor list.

    ``sizes[i]`` — run lengths of stepped tensor ``i``; ``run_slot`` — each run's slot
    (int64, on the tensors' device; padding → ``slots``, the discard slot); ``slot_range[i]``
    — the slots ``[lo, hi)`` of stepped tensor ``i`` (``hi - lo`` = its map's
    ``num_tensors``, 1 for a whole tensor)."""

    def __init__(self, tensors: Sequence[torch.Tensor], maps: Sequence[Optional[SegmentMap]]):
        self.sizes: list[list[int]] = []
        self.slot_range: list[tuple[int, int]] = []
        slots_of_runs: list[int] = []
        base = 0
        dist_flags = {m.distributed for m in maps if m is not None}
        if maps and any(m is None for m in maps):
            dist_flags.add(False)
        if len(dist_flags) > 1:
            raise RuntimeError("layer-wise optimizer: one step() call mixes partitioned and whole tensors")
        self.distributed = dist_flags == {True}
        groups = {id(m.group): m.group for m in maps if m is not None}
        if self.distributed and len(groups) > 1:
            raise RuntimeError("layer-wise optimizer: one step() call spans several process groups")
        self.group = next(iter(groups.values()), None)
        pending_discard = []
        for t, m in zip(tensors, maps):
            if m is None:
                self.sizes.append([t.numel()])
                slots_of_runs.append(base)
                self.slot_range.append((base, base + 1))
                base += 1
            else:
                if m.numel != t.numel():
                    raise RuntimeError(f"layer-wise optimizer: segment map covers {m.numel} elements, "
                                       f"the stepped tensor has {t.numel()}")
                self.sizes.append([r[2] for r in m.runs])
                for idx, _, _ in m.runs:
                    if idx < 0:
                        pending_discard.append(len(slots_of_runs))
                        slots_of_runs.append(-1)
                    else:
                        slots_of_runs.append(base + idx)
                self.slot_range.append((base, base + m.num_tensors))
                base += m.num_tensors
        self.slots = base
        for i in pending_discard:
            slots_of_runs[i] = base
        device = tensors[0].device if tensors else torch.device("cpu")
        self.run_slot = torch.tensor(slots_of_runs, dtype=torch.int64, device=device)

    def views(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every run of ``tensors`` (laid out like the stepped tensors) as a view, in order."""
        out: list[torch.Tensor] = []
        for t, sizes in zip(tensors, self.sizes):
            # A whole tensor is its own run: no reshape (a channels_last one would be copied).
            out.extend(torch.split(t.reshape(-1), sizes) if len(sizes) > 1 else (t,))
        return out

    def squared_norms(self, columns: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """Per-slot Σ x² of each column (a list of tensors laid out like the stepped tensors),
        as a ``[slots, K]`` float64 table, summed over the group when the maps are
        distributed (one all-reduce for the whole call)."""
        per_run = []
        for col in columns:
            norms = torch._foreach_norm(self.views(col))
            per_run.append(torch.stack(norms).to(torch.float64).square())
        runs = torch.stack(per_run, dim=1)  # [runs, K]
        table = torch.zeros(self.slots + 1, len(columns), dtype=torch.float64, device=runs.device)
        table.index_add_(0, self.run_slot, runs)
        table = table[: self.slots]
        if self.distributed:
            from agvm_ds import collectives

            table = collectives.all_reduce_sum_group(table, self.group).to(runs.device)
        return table

    def per_run(self, per_slot: torch.Tensor) -> list[torch.Tensor]:
        """A per-slot factor (``[slots]``) as one 0-dim tensor per run (padding: 0, so padding
        never moves), in run order, for the foreach ops."""
        full = torch.cat([per_slot, per_slot.new_zeros(1)])
        return list(full.index_select(0, self.run_slot).unbind())


class LayerwiseOptimizerMixin:
    """Segment-map bookkeeping for an optimizer with whole-tensor statistics.

    ``layerwise_statistics = True`` tells :func:`attach_layerwise` (and the base-optimizer
    registry) that the class computes per-tensor norms and accepts segment maps."""

    layerwise_statistics = True

    def attach_segments(self, segments: dict[int, SegmentMap], zero_stage: int) -> None:
        """Record the maps (``id(stepped tensor) → SegmentMap``); with ``zero_stage ≥ 1`` a
        stepped tensor without a map raises from now on."""
        self._segments = dict(segments)
        self._require_maps = int(zero_stage) >= 1
        self._plans = {}

    def _plan(self, tensors: Sequence[torch.Tensor]) -> CallPlan:
        key = tuple((id(t), t.numel()) for t in tensors)
        plans = self.__dict__.setdefault("_plans", {})
        plan = plans.get(key)
        if plan is None:
            segments = getattr(self, "_segments", {})
            maps = [segments.get(id(t)) for t in tensors]
            if getattr(self, "_require_maps", False) and any(m is None for m in maps):
                raise RuntimeError(f"{type(self).__name__}: a stepped tensor has no segment map under ZeRO; "
                                   "its norm would be that of a slice (call agvm_ds.optim.layerwise.attach_layerwise "
                                   "after deepspeed.initialize)")
            plan = plans[key] = CallPlan(tensors, maps)
        return plan


def base_of(optimizer):
    """The optimizer that actually steps: AGVM's base, else ``optimizer`` itself."""
    return getattr(optimizer, "base", optimizer)


def attach_layerwise(engine, optimizer=None) -> bool:
    """After ``deepspeed.initialize``: give a layer-wise base optimizer the segment maps of
    the tensors this engine will step (see :func:`layerwise_segments`).
    A no-op returning ``False`` for optimizers without layer-wise statistics."""
    base = base_of(optimizer if optimizer is not None else engine.basic_optimizer)
    if not getattr(base, "layerwise_statistics", False):
        return False

    base.attach_segments(layerwise_segments(engine), int(engine.zero_optimization_stage()))
    return True


def layerwise_segments(engine) -> dict:
    """``id(stepped tensor) → SegmentMap`` for every flat tensor of
    :func:`agvm_ds.zero_layout.flat_partitions`; tensor indices number the params the flat tensor is cut from,
    identically on every rank of the partition group."""
    from agvm_ds.zero_layout import flat_partitions

    return {id(fp.flat): SegmentMap.from_pieces(fp.flat.numel(), [(j, at, n) for j, _, at, n in fp.runs],
                                                len(fp.params), fp.group, distributed=fp.distributed,
                                                sources=tuple(id(p) for p in fp.params))
            for fp in flat_partitions(engine)}
