"""Per-ZeRO-stage adapters: where this rank's share of the averaged gradient lives.

This is the only module that reads DeepSpeed internals (measured on deepspeed 0.19.8;
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


@dataclass(frozen=True)
class Piece:
    rank: int      # owner
    p_lo: int      # [p_lo, p_hi) in the parameter's flattened elements
    p_hi: int
    acc_lo: int    # offset in the owner's local layout


def _device():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


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
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
        if self.engine.fp16_enabled():
            return float(getattr(self.zero, "loss_scale", getattr(self.zero, "cur_scale", 1.0)))
        return 1.0

    def set_gradient_clipping(self, max_norm: float) -> None:
        set_engine_gradient_clipping(self.engine, max_norm)


def set_engine_gradient_clipping(engine, max_norm: float) -> None:
    """Stage 0 clips from the engine's config on every step; ZeRO optimizers keep their own
    copy of the threshold (``clip_grad``), read on every step."""
    engine._config.gradient_clipping = float(max_norm)
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = float(max_norm)


class Stage0Adapter(StageAdapter):
    stage = 0

    def __init__(self, engine, groups, group_modules):
        super().__init__(engine, groups, group_modules)
        self._own = self._per_parameter_layout(lambda p: (p.numel(), None))
        # bf16 / fp16 wrappers optimize fp32 copies: map model params to them for Adam state.
        opt_groups = getattr(self.zero, "fp32_groups", None)
        self._state_param = {}
        if opt_groups is not None:
            for model_g, fp32_g in zip(getattr(self.zero, "fp16_groups"), opt_groups):
                for mp, fp in zip(model_g, fp32_g):
                    self._state_param[id(mp)] = fp
        self._base_state = engine.basic_optimizer.state

    def _moment(self, p, key):
        st = self._base_state.get(self._state_param.get(id(p), p))
        return None if not st or key not in st else st[key]

    def _raw_chunks(self, second_moment=None):
        for m, gi, p, lo, hi, acc in self._own:
            g = p.grad
            grad = torch.zeros(hi - lo, device=self.device) if g is None else g.detach().reshape(-1)[lo:hi].float()
            v = None
            if second_moment:
                mom = self._moment(p, second_moment)
                v = None if mom is None else mom.reshape(-1)[lo:hi].float()
            yield Chunk(m, gi, acc, acc + hi - lo, grad, v)

    def grad_views(self):
        for _, _, p, lo, hi, _ in self._own:
            if p.grad is not None:
                yield p.grad.reshape(-1)[lo:hi]

    def local_unreduced_grad(self, p):
        return p.grad


class Stage12Adapter(StageAdapter):
    """ZeRO-1 and ZeRO-2: flat, padded param-group buffers split into equal partitions."""

    def __init__(self, engine, groups, group_modules):
        super().__init__(engine, groups, group_modules)
        zo = self.zero
        self.stage = int(engine.zero_optimization_stage())
        self.reduces_every_micro_step = self.stage == 2
        self._base = []
        base = 0
        for gi in range(len(zo.round_robin_bit16_groups)):
            ps = int(zo.partition_size[gi])
            for p, off in zip(zo.round_robin_bit16_groups[gi], zo.round_robin_bit16_offsets[gi]):
                pieces = []
                n = p.numel()
                for r in range(self.world):
                    lo, hi = max(off, r * ps), min(off + n, (r + 1) * ps)
                    if lo < hi:
                        pieces.append(Piece(r, lo - off, hi - off, base + lo - r * ps))
                self.layout[id(p)] = pieces
            self._base.append((base, ps))
            base += ps
        self.local_numel = base

    def _raw_chunks(self, second_moment=None):
        # At the boundary only (between boundaries ZeRO-2 uses copy_owned_grad).
        zo = self.zero
        for gi, (base, ps) in enumerate(self._base):
            m = self.group_modules[gi]
            v = None
            if second_moment:
                st = zo.optimizer.state.get(zo.single_partition_of_fp32_groups[gi])
                v = None if not st or second_moment not in st else st[second_moment].reshape(-1).float()
            held = zo.averaged_gradients.get(gi) if isinstance(zo.averaged_gradients, dict) else None
            flat = getattr(held, "flat_partition", None)
            if flat is not None:  # bf16 model, fp32 accumulation: one flat buffer already
                yield Chunk(m, gi, base, base + ps, flat.reshape(-1).float(), v)
                continue
            parts = [] if held is None else [t.reshape(-1) for t in held]
            if sum(t.numel() for t in parts) != ps:  # nothing held (or an unexpected shape): zeros / one copy
                grad = torch.zeros(ps, device=self.device) if not parts else torch.cat([t.float() for t in parts])
                yield Chunk(m, gi, base, base + ps, grad, v)
                continue
            # A list of per-parameter views (and padding) covering the partition in order.
            at = 0
            for t in parts:
                n = t.numel()
                yield Chunk(m, gi, base + at, base + at + n, t if t.dtype == torch.float32 else t.float(),
                            None if v is None else v[at:at + n])
                at += n

    def grad_views(self):
        for held in self.zero.averaged_gradients.values():
            if held is None:
                continue
            flat = getattr(held, "flat_partition", None)
            yield from ([flat] if flat is not None else held)

    def local_unreduced_grad(self, p):
        if self.stage != 1:
            return super().local_unreduced_grad(p)
        return self.zero.get_param_gradient_attribute(p)

    def copy_owned_grad(self, out):
        zo = self.zero
        for gi, (base, ps) in enumerate(self._base):
            dst = out[base:base + ps]
            if zo.all_grad_tensors.get(gi) is None:
                dst.zero_()
                continue
            # Views of the reduced running sums plus padding, concatenated straight into
            # ``out``: one copy of P/N, no intermediate flat buffer.
            parts = zo.get_flat_partition(zo.params_in_partition[gi], zo.first_offset[gi], zo.partition_size[gi],
                                          dtype=torch.float32, device=_device(), param_group_idx=gi,
                                          return_tensor_list=True)
            concat_into(dst, [(t.reshape(-1), t.numel()) for t in parts])

    def engine_nonfinite_check(self):
        # stage_1_and_2.step() all-reduces the global norm before any group's step whenever
        # compute_grad_norm is on (the default), reporting inf/NaN as -1; fp32/fp16 then skip
        # the step themselves, bf16 does not: AGVM.step asks this and skips it.
        if not getattr(self.zero, "compute_grad_norm", False):
            return None
        zo = self.zero
        return lambda: _invalid_norm(zo._global_grad_norm)


class Stage12CompactAdapter(Stage12Adapter):
    """ZeRO-2 (or offload-free ZeRO-1 variants) with a bf16 model and ``data_types.
    grad_accum_dtype: "fp32"``: stage_1_and_2 then accumulates each micro-step's reduced
    gradient straight into one fp32 flat partition per group (``averaged_gradients[i].
    flat_partition``, a ``GradPartitionBufferGroup``) and never fills ``all_grad_tensors``,
    which the parent's half-way snapshot reads; without this override the ``micro``
    snapshot is all zeros and every update's statistics are 0/0 (μ silently never moves)."""

    def copy_owned_grad(self, out):
        super().copy_owned_grad(out)  # non-compact groups (e.g. Muon's); compact ones read zeros there
        zo = self.zero
        for gi, (base, ps) in enumerate(self._base):
            if not zo._use_compact_grad_partition_buffer(gi):
                continue
            held = zo.averaged_gradients.get(gi)
            flat = getattr(held, "flat_partition", None)
            dst = out[base:base + ps]
            if flat is None:  # nothing reduced into this group yet
                dst.zero_()
            else:
                dst.copy_(flat.reshape(-1))


class BF16OptimizerAdapter(StageAdapter):
    """DeepSpeed's ``BF16_Optimizer`` (bf16 model, ZeRO-1, ``data_types.grad_accum_dtype:
    "fp32"``; deepspeed/runtime/bf16_optimizer.py). Its layout per param group ``i``:

    * ``bf16_groups[i]`` — the trainable params, back to back in one flat buffer padded at
      the end to a multiple of ``2 · world``; ``partition_size = flat.numel() // world``;
      rank ``r`` owns ``[r · ps, (r + 1) · ps)`` (its fp32 master is
      ``fp32_groups_flat_partition[i]``, the tensor the base optimizer steps, so Adam's
      second moment is that tensor's state, e.g. ``exp_avg_sq``);
    * ``fp32_groups_gradients_flat[i]`` — a *full* (unpartitioned) fp32 gradient buffer of
      the same layout. The engine's backward epilogue adds each micro-step's bf16 grads
      into it (``update_hp_grads``, or hooks with ``immediate_grad_update``), so before the
      boundary reduction it holds this rank's local, unreduced running sum
      (``fp32_groups_gradients[i][j]`` per param); at the boundary the engine all-reduces
      it in place (averaging, in ``communication_data_type``), after which this rank's
      owned part is ``fp32_groups_gradient_flat_partition[i]``.

    It reduces only at the boundary (like ZeRO-1), computes the global norm of the full
    averaged gradient on every step and skips the step itself when it is inf/NaN
    (``overflow``), in every configuration."""

    reduces_every_micro_step = False

    def __init__(self, engine, groups, group_modules):
        super().__init__(engine, groups, group_modules)
        zo = self.zero
        self.stage = int(engine.zero_optimization_stage())
        self._where = {}  # id(param) -> (group, index in the group): local_unreduced_grad
        self._base = []
        base = 0
        for gi, params in enumerate(zo.bf16_groups):
            ps = int(zo.fp32_groups_gradient_flat_partition[gi].numel())
            off = 0
            for j, p in enumerate(params):
                n = p.numel()
                pieces = []
                for r in range(self.world):
                    lo, hi = max(off, r * ps), min(off + n, (r + 1) * ps)
                    if lo < hi:
                        pieces.append(Piece(r, lo - off, hi - off, base + lo - r * ps))
                self.layout[id(p)] = pieces
                self._where[id(p)] = (gi, j)
                off += n
            self._base.append((base, ps))
            base += ps
        self.local_numel = base
        missing = [p for p in self.params if id(p) not in self.layout]
        if missing:  # AGVM's groups and BF16_Optimizer's must be the same parameters
            raise ValueError(f"BF16_Optimizer holds no partition for {len(missing)} AGVM parameter(s)")

    def _raw_chunks(self, second_moment=None):
        # At the boundary (after the all-reduce): one view of this rank's owned averaged
        # gradient per group, padding included (zero there, as in DeepSpeed's buffer).
        zo = self.zero
        for gi, (base, ps) in enumerate(self._base):
            v = None
            if second_moment:
                st = zo.optimizer.state.get(zo.fp32_groups_flat_partition[gi])
                v = None if not st or second_moment not in st else st[second_moment].reshape(-1).float()
            g = zo.fp32_groups_gradient_flat_partition[gi].reshape(-1)
            yield Chunk(self.group_modules[gi], gi, base, base + ps, g if g.dtype == torch.float32 else g.float(), v)

    def local_unreduced_grad(self, p):
        gi, j = self._where[id(p)]
        return self.zero.fp32_groups_gradients[gi][j]

    def copy_owned_grad(self, out):
        # Only ZeRO-2/3 snapshot between boundaries; BF16_Optimizer streams local sums instead.
        raise NotImplementedError("BF16_Optimizer reduces only at the accumulation boundary")

    def engine_nonfinite_check(self):
        # BF16_Optimizer.step() computes the global norm of the (all-reduced, hence equal on
        # every rank) averaged gradient before calling the base step, and returns early with
        # ``overflow`` set when it is inf/NaN; the guard below is a second line.
        zo = self.zero
        return lambda: _invalid_norm(getattr(zo, "_global_grad_norm", None))


class Stage3Adapter(StageAdapter):
    stage = 3
    reduces_every_micro_step = True

    def __init__(self, engine, groups, group_modules):
        super().__init__(engine, groups, group_modules)
        # ZeRO-3 partitions every parameter on its own: ceil(numel / N) elements per rank.
        self._own = self._per_parameter_layout(lambda p: (int(p.ds_numel), int(p.ds_tensor.ds_numel)))

    def _raw_chunks(self, second_moment=None):
        from deepspeed.utils import safe_get_local_grad, safe_get_local_optimizer_state

        for m, gi, p, lo, hi, acc in self._own:
            g = safe_get_local_grad(p)
            grad = torch.zeros(hi - lo, device=self.device) if g is None else g.reshape(-1)[: hi - lo].float()
            v = None
            if second_moment:
                try:
                    s = safe_get_local_optimizer_state(p, second_moment)
                except (KeyError, AttributeError, AssertionError):
                    s = None
                v = None if s is None else s.reshape(-1)[: hi - lo].float()
            yield Chunk(m, gi, acc, acc + hi - lo, grad, v)


    def engine_nonfinite_check(self):
        # stage3.step() all-reduces the global norm and skips the step on inf/NaN (-1) in
        # every precision before any sub-group's step; the test below is a second line.
        zo = self.zero
        return lambda: _invalid_norm(zo._global_grad_norm)


def _invalid_norm(norm) -> bool:
    if norm is None:
        return False
    value = float(norm)
    return not math.isfinite(value) or value < 0


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
        offsets, at = [], 0
        for p in params:
            offsets.append(at)
            at += p.numel()
        return offsets

    def cut(flat, params, offsets, ps, group) -> FlatPartition:
        # Group-buffer elements [r·ps, (r+1)·ps) of this rank, param j at offsets[j].
        r = rank_in(group)
        runs = []
        for j, (p, off) in enumerate(zip(params, offsets)):
            lo, hi = max(off, r * ps), min(off + p.numel(), (r + 1) * ps)
            if lo < hi:
                runs.append((j, lo - off, lo - r * ps, hi - lo))
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


def layerwise_segments(engine) -> dict:
    """``id(stepped tensor) → SegmentMap`` (agvm_ds.optim.layerwise) for every flat tensor of
    :func:`flat_partitions`; tensor indices number the params the flat tensor is cut from,
    identically on every rank of the partition group."""
    from agvm_ds.optim.layerwise import SegmentMap

    return {id(fp.flat): SegmentMap.from_pieces(fp.flat.numel(), [(j, at, n) for j, _, at, n in fp.runs],
                                                len(fp.params), fp.group, distributed=fp.distributed,
                                                sources=tuple(id(p) for p in fp.params))
            for fp in flat_partitions(engine)}


def build_adapter(engine, groups, group_modules) -> StageAdapter:
    stage = int(engine.zero_optimization_stage())
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if isinstance(engine.optimizer, BF16_Optimizer):  # bf16 + ZeRO-1 + fp32 grad accumulation
        return BF16OptimizerAdapter(engine, groups, group_modules)
    if stage in (1, 2) and getattr(engine.optimizer, "_use_compact_grad_partition_buffer", None) is not None \
            and not getattr(engine.optimizer, "cpu_offload", False) and any(engine.optimizer._use_compact_grad_partition_buffer(i)
                    for i in range(len(engine.optimizer.round_robin_bit16_groups))):
        return Stage12CompactAdapter(engine, groups, group_modules)
    if stage == 0:
        return Stage0Adapter(engine, groups, group_modules)
    if stage in (1, 2):
        return Stage12Adapter(engine, groups, group_modules)
    if stage == 3:
        return Stage3Adapter(engine, groups, group_modules)
    raise ValueError(f"unsupported ZeRO stage {stage}")


def attach_controller(engine, controller) -> None:
    """The one seam between a statistics controller and its engine.

    Routes the engine's backward epilogue, stage-0/1 boundary reduction and optimizer step
    to the controller's callbacks (:func:`_install_engine_hooks`), registers its forward
    pre-hook on the module where its estimator asks for one, and sets ``engine.agvm`` (what
    ``agvm_ds.modulation``, the training loop and elastic resume read). Checkpoints reach
    the controller through the checkpoint engine, not through the engine's methods."""
    _install_engine_hooks(engine, controller._after_backward, controller._before_reduction,
                          controller._after_optimizer_step, controller.adapter.engine_skipped_step)
    if controller.wants_forward_hook:
        engine.module.register_forward_pre_hook(controller._on_forward)
    engine.agvm = controller


def _install_engine_hooks(engine, after_backward, before_reduction, after_step, engine_skipped):
    """Wrap the engine's backward epilogue (every backward, after DeepSpeed's reduction and
    before any clipping), for stages 0/1 its boundary reduction (local grads still
    unreduced), and the step of the optimizer the engine drives (ZeRO's, or AGVM itself),
    which reports whether DeepSpeed skipped it. Instance attributes shadow the methods, so
    DeepSpeed's own calls and its torch-style backward hook path go through the wrappers."""
    orig_epilogue = engine._backward_epilogue
    orig_reduce = engine.allreduce_gradients
    opt = engine.optimizer
    orig_step = opt.step

    def _backward_epilogue():
        orig_epilogue()
        after_backward()

    def allreduce_gradients(*args, **kwargs):
        before_reduction()
        return orig_reduce(*args, **kwargs)

    def step(*args, **kwargs):
        out = orig_step(*args, **kwargs)
        after_step(engine_skipped())
        return out

    engine._backward_epilogue = _backward_epilogue
    engine.allreduce_gradients = allreduce_gradients
    opt.step = step
