"""Per-ZeRO-stage adapters, common part: where this rank's share of the averaged gradient lives.

This package (one file per DeepSpeed layout) and :mod:`agvm_ds.zero_layout` are where AGVM reads DeepSpeed internals (measured on deepspeed 0.19.8;
docs/agvm.md lists who touches them). Each adapter describes an **ownership layout**: every trainable
element is owned by exactly one rank, and each rank keeps its owned elements in one flat
fp32 buffer ("local layout"). The layout is chosen so that the averaged gradient DeepSpeed
already holds on this rank *is* this rank's owned part:

* stage 0 — DeepSpeed keeps the full averaged gradient everywhere; we split each
  parameter into ``world`` near-equal slices (as ZeRO-3 would), so statistics cost P/N;
* stage 1/2 — DeepSpeed's flat group buffers, cut into ``partition_size`` pieces per rank
  (``round_robin_bit16_groups`` order, alignment padding included);
* stage 3 — each parameter's own partition (``ds_tensor``, ``ceil(numel / world)``).

Each adapter yields :class:`Chunk` s — a contiguous run of the local layout with its module,
its param group, the averaged gradient and (for Adam) the second moment there.
``layout`` maps every parameter to the pieces every rank owns, which the streaming reducer
needs to send signed gradients straight to their owners.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from agvm_ds.core.chunks import Chunk, coalesce, concat_into
from agvm_ds import mutations
from agvm_ds.zero_layout import flat_cut


@dataclass(frozen=True)
class Piece:
    rank: int      # owner
    p_lo: int      # [p_lo, p_hi) in the parameter's flattened elements
    p_hi: int
    acc_lo: int    # offset in the owner's local layout


def _device():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def flat_layout(params, offsets, part: int, world: int, base: int) -> dict[int, list[Piece]]:
    """``id(param) → pieces`` for params packed at ``offsets`` in a flat buffer cut into ``part``
    elements per rank (:func:`agvm_ds.zero_layout.flat_cut`), this buffer's partition starting
    at ``base`` in every rank's local layout."""
    out: dict[int, list[Piece]] = {id(p): [] for p in params}
    sizes = [p.numel() for p in params]
    shift = 1 if mutations.active("owner_next") else 0
    for r in range(world):
        for j, lo, at, n in flat_cut(offsets, sizes, part, (r + shift) % world):
            out[id(params[j])].append(Piece(r, lo, lo + n, base + at))
    return out


def _even_split(numel: int, world: int, part: int | None = None) -> list[tuple[int, int, int]]:
    part = part or math.ceil(numel / world)
    out = []
    for r in range(world):
        lo, hi = r * part, min(numel, (r + 1) * part)
        if lo < hi:
            out.append((r, lo, hi))
    return out


class StageAdapter:
    """Common bookkeeping; subclasses fill ``layout``/``local_numel`` and the reads."""

    stage: int = -1
    #: DeepSpeed reduces (and partitions) gradients on every micro-step (ZeRO-2/3).
    reduces_every_micro_step: bool = False
    #: This rank's own, unreduced running sum is still there just before DeepSpeed's
    #: boundary reduction (stage 0, ZeRO-1 without overlap_comm); where it is not, a split
    #: that needs it streams each micro-step's gradient from tensor hooks instead.
    local_grad_at_boundary: bool = True

    def __init__(self, engine, groups: list[list[torch.nn.Parameter]], group_modules: list[int]):
        self.engine = engine
        self.zero = engine.optimizer
        self.groups = groups
        self.group_modules = group_modules
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.layout: dict[int, list[Piece]] = {}
        self.local_numel = 0
        self.device = torch.device(_device())
        self.params = [p for g in groups for p in g]

    def _per_parameter_layout(self, sizes) -> list[tuple[int, int, torch.nn.Parameter, int, int, int]]:
        """Split each parameter evenly over the ranks, in group order; fill ``layout`` and
        ``local_numel``; return this rank's pieces as (module, group, param, lo, hi, offset)."""
        offsets = [0] * self.world
        own = []
        for gi, g in enumerate(self.groups):
            for p in g:
                numel, part = sizes(p)
                pieces = []
                for r, lo, hi in _even_split(numel, self.world, part):
                    pieces.append(Piece(r, lo, hi, offsets[r]))
                    if r == self.rank:
                        own.append((self.group_modules[gi], gi, p, lo, hi, offsets[r]))
                    offsets[r] += hi - lo
                self.layout[id(p)] = pieces
        self.local_numel = offsets[self.rank]
        return own

    #: Runs of small chunks are copied into staging buffers of this many elements, so the
    #: statistics pass runs a few large vector operations instead of a dozen per parameter.
    chunk_width: int = 1 << 20
    staging: dict = {}

    # -- reads -----------------------------------------------------------------------
    def chunks(self, second_moment: Optional[str] = None) -> Iterator[Chunk]:
        """This rank's owned gradient (and, when ``second_moment`` names the base optimizer's
        state key of it, that second moment) in local-layout order, runs of small pieces
        merged for the statistics pass. A chunk's tensors may be staging buffers reused by
        the next chunk: consume each chunk before asking for the next."""
        self.staging = {}  # the staging buffers of this walk (for memory accounting)
        return coalesce(self._raw_chunks(second_moment), self.chunk_width, self.staging)

    def _raw_chunks(self, second_moment: Optional[str] = None) -> Iterator[Chunk]:
        """The same, one piece as DeepSpeed holds it (views where it can), uncopied."""
        raise NotImplementedError

    def grad_views(self) -> Iterator[torch.Tensor]:
        """This rank's owned averaged gradient as views (no copies), for the per-step
        finiteness check."""
        for ch in self._raw_chunks():
            yield ch.grad

    def local_unreduced_grad(self, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        """This rank's own (not yet reduced) accumulated gradient; stages 0 and 1 only."""
        raise NotImplementedError(f"stage {self.stage} reduces gradients during backward")

    def copy_owned_grad(self, out: torch.Tensor) -> None:
        """Write this rank's owned, already reduced running gradient into ``out`` (the local
        layout, ``local_numel`` elements) between accumulation boundaries (ZeRO-2/3)."""
        for ch in self._raw_chunks():
            out[ch.lo:ch.hi].copy_(ch.grad)

    def engine_nonfinite_check(self) -> Optional[Callable[[], bool]]:
        """A test, valid inside the optimizer step, that this step's gradient is non-finite
        on some rank, read from a gradient norm DeepSpeed all-reduces on every step anyway;
        ``None`` where DeepSpeed computes no such norm (the controller then checks itself)."""
        return None

    def engine_skipped_step(self) -> bool:
        """Whether DeepSpeed itself just skipped the optimizer step (overflow / invalid norm)."""
        return bool(getattr(self.engine.optimizer, "overflow", False))

    def grad_scale(self) -> float:
        """The loss scale still inside the gradients DeepSpeed holds at the boundary (1 when
        none): ``torch_autocast`` with fp16 scales the loss with a ``torch.amp.GradScaler``
        (the engine's at stage 0, the ZeRO optimizer's at 1–3) that unscales only inside the
        optimizer step; DeepSpeed's own fp16 keeps its loss scaler's scale. Update steps only:
        ``get_scale`` reads the scaler's device scalar (a documented host sync)."""
        scaler = getattr(self.zero, "torch_autocast_gradscaler", None) \
            or getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        if scaler is not None and scaler.is_enabled() and not mutations.active("autocast_scaler_ignored"):
            return float(scaler.get_scale())
        if self.engine.fp16_enabled() and not mutations.active("fp16_scale_ignored"):
            return float(getattr(self.zero, "loss_scale", getattr(self.zero, "cur_scale", 1.0)))
        return 1.0


def set_engine_gradient_clipping(engine, max_norm: float) -> None:
    """Stage 0 clips from the engine's config on every step; ZeRO optimizers keep their own
    copy of the threshold (``clip_grad``), read on every step."""
    engine._config.gradient_clipping = float(max_norm)
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = float(max_norm)


def _invalid_norm(norm) -> bool:
    if norm is None:
        return False
    value = float(norm)
    return not math.isfinite(value) or value < 0
