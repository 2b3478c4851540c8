"""Measure per-module gradient statistics inside a DeepSpeed engine and drive μ.

What the two halves G1, G2 are and how the second vector ``S`` reaches each owner is the
estimator's (:mod:`agvm_ds.core.estimators`, chosen once by ``build_estimator``); the
controller calls its hooks from the engine callbacks and owns the rest, the same for every
estimator:

On each accumulation boundary, after DeepSpeed's reduction and before any clipping, every
rank sums ⟨G1,G2⟩, |G1|², |G2|² (Adam-preconditioned when asked) over the elements it
owns, per module (:mod:`agvm_ds.core.statistics`), and one asynchronous all-reduce of a
float64 ``[modules × 3 + 1]`` tensor finishes the job; the extra slot counts chunks with a
non-finite value. Under Adam preconditioning the same tensor also carries the raw halves'
sums (``[modules × 6 + 1]``, still one collective): the gradient-noise scale is defined on
raw gradients (:mod:`agvm_ds.core.modulator`), so the pass also takes them there. The
all-reduce is waited for where μ is first needed: on the optimizer step's first call
(``AGVM.step`` asks :meth:`AGVMController.skip_step`).

A non-finite gradient anywhere skips the optimizer step on every rank and leaves μ
unchanged, in every precision. On update steps the statistics reveal it; on other steps,
under ZeRO-1/2/3, the step guard reads the global gradient norm DeepSpeed all-reduces
anyway (stage 0 and ``compute_grad_norm: false`` check the owned gradient themselves).

The controller's state — the step μ applies to, the pending skip decision, the skipped and
non-finite step counts — lives here, not on the optimizer; :meth:`AGVMController.state_dict`
/ :meth:`~AGVMController.load_state_dict` carry what a checkpoint needs
(:mod:`agvm_ds.checkpoint_engine` writes it into DeepSpeed's model-states file).

Limitations:
    Pipeline and tensor parallelism are not handled: the data-parallel group is assumed to
    be the world.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist

from agvm_ds.config.agvm import AGVMConfig
from agvm_ds.core import native
from agvm_ds.core.adapters import build_adapter
from agvm_ds.core.estimators import Estimator
from agvm_ds.core.modulator import Modulator
from agvm_ds.core.optimizer import AGVM
from agvm_ds.core.reducer import OwnerReducer, default_bucket_size
from agvm_ds.core.statistics import BLOCK, SLICE, Split, combine, gram, preconditioned_stats, workspace
from agvm_ds.optim.registry import OptimizerInfo
from agvm_ds import mutations

log = logging.getLogger("agvm_ds")


class AGVMController:
    """The statistics pass, its all-reduce and the non-finite skip of one engine.

    The AGVM optimizer is handed over on construction (its steps ask :meth:`skip_step` and
    :attr:`step_index`); ``adapters.attach_controller(engine, controller)`` then routes the
    engine's callbacks here (the ``_after_backward`` … ``_after_optimizer_step`` methods).
    """

    def __init__(self, engine, optimizer: AGVM, modulator: Modulator, cfg: AGVMConfig,
                 groups: list[list[torch.nn.Parameter]], group_dicts: list[dict],
                 precondition: Optional[OptimizerInfo], estimator: Estimator):
        """``precondition``: the base's registry row when Φ is taken on Adam-preconditioned
        halves (its ``second_moment`` state, ``beta2`` and ``eps`` are read), else None.
        ``estimator``: from ``build_estimator`` for this engine's accumulation count and
        world size."""
        self.engine = engine
        self.optimizer = optimizer
        self.modulator = modulator
        self.cfg = cfg
        self.group_dicts = group_dicts
        self.precondition = precondition
        self.estimator = estimator
        group_modules = [modulator.modules.index(g["module"]) for g in group_dicts]
        self.adapter = build_adapter(engine, groups, group_modules)
        self.params = self.adapter.params
        self.rank, self.world = self.adapter.rank, self.adapter.world
        self.A = int(engine.gradient_accumulation_steps())
        # Default: ZeRO's own bucket (one filling, one in flight), so AGVM's stream issues
        # about as many collectives per micro-step as DeepSpeed's reduction (docs/agvm.md).
        # ZeRO's bucket always takes a whole parameter, however large: so does AGVM's.
        bucket = cfg.bucket_size
        if bucket is None:
            largest = max((int(getattr(p, "ds_numel", p.numel())) for p in self.params), default=0)
            bucket = default_bucket_size(engine.zero_reduce_bucket_size(), largest)
        self.bucket_size = bucket
        self.reducer = OwnerReducer(self.adapter.layout, self.rank, self.world, bucket)
        # The statistics pass borrows the bucket budget: 2 staging (adapter) + 3 scratch buffers.
        self.scratch_numel = min(SLICE, max(BLOCK, bucket // 5))
        self.adapter.chunk_width = self.scratch_numel
        # Build (once per machine, ~1 s) or load the fused CPU kernel now rather than inside
        # the first update step; the pass needs no scratch buffers when it is there.
        self.fused = self.adapter.device.type == "cpu" and native.kernels() is not None
        self.nonfinite_steps = 0  # steps with a non-finite gradient, skipped or not
        self.skipped_steps = 0  # optimizer steps skipped for one (by AGVM or DeepSpeed)
        self._boundary_step: Optional[int] = None  # the engine's step at the last boundary
        self._skip: bool | None = False  # this step's verdict; None: decided on its first call
        self._step_nonfinite = False
        self._pending = None  # (all-reduce work, stats tensor, step) of an update in flight
        self._pending_flag = None  # (all-reduce work, flag) of AGVM's own finiteness check
        self._chunk_modules = None  # (list, device copy) of the statistics pass's chunk → module map
        self.peak_buffer_bytes = 0  # AGVM's own buffers at the statistics pass, largest so far
        # Where DeepSpeed already all-reduces a gradient norm every step, plain steps read it
        # (at step time, through AGVM.step) instead of running a check of their own.
        self.engine_check = self.adapter.engine_nonfinite_check()
        # The noise scale's b per half: the estimator states it for this world and micro-batch.
        modulator.set_half_samples(*estimator.half_samples(int(engine.train_micro_batch_size_per_gpu())))
        optimizer.attach(self)  # the groups above are the ones measured; its steps ask here

    # -- what the optimizer asks on its step -------------------------------------------
    @property
    def step_index(self) -> int:
        """The optimizer step μ applies to: the engine's global step at the last accumulation
        boundary. After a load it is read from the engine, which restores its counter only
        after this controller's state (``load_state_dict`` must not read it)."""
        return int(self.engine.global_steps) if self._boundary_step is None else self._boundary_step

    def skip_step(self) -> bool:
        """Whether this optimizer step is a no-op on every rank; decided once per step, on the
        first call (ZeRO steps the optimizer once per group or sub-group)."""
        if self._skip is None:
            self._skip = bool(self._step_guard())
        return self._skip

    # -- step bookkeeping ------------------------------------------------------------
    def _step(self) -> int:
        return int(self.engine.global_steps)

    def _micro_index(self) -> int:
        return int(self.engine.micro_steps) % self.A

    def _is_update(self) -> bool:
        return self.modulator.is_update_step(self._step())

    # -- engine callbacks (routed here by adapters.attach_controller) ------------------
    @property
    def wants_forward_hook(self) -> bool:
        """Whether the estimator needs :meth:`_on_forward` before every forward pass."""
        return self.estimator.wants_forward_hook(self.adapter)

    def _on_forward(self, module, args):
        """The module's forward pre-hook: the estimator arms what an update step's backward needs."""
        if not module.training or not torch.is_grad_enabled() or not self._is_update():
            return
        self.estimator.on_forward(self.adapter, self.reducer)

    def _before_reduction(self):
        """Stages 0/1, inside the engine's epilogue, before DeepSpeed's own reduction (where
        the local sums are still unreduced there: not ZeRO-1 with overlap_comm)."""
        if not self.adapter.local_grad_at_boundary:
            return
        if not (self.engine.is_gradient_accumulation_boundary() and self._is_update()):
            return
        self.estimator.before_reduction(self.adapter, self.reducer)

    def _after_backward(self):
        update = self._is_update()
        boundary = self.engine.is_gradient_accumulation_boundary()
        if update:
            self.estimator.after_backward(self.adapter, self.reducer, self._micro_index(), boundary)
        if boundary:
            self.estimator.end_accumulation()
            self._finish_step(update)

    @torch.no_grad()
    def _update_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's float64 share of ⟨G1,G2⟩, |G1|², |G2|² — ``[modules, 3]``, or
        ``[modules, 6]`` with the raw halves' sums after the preconditioned ones — and how
        many of its chunks hold a non-finite value (a device scalar: no host sync here)."""
        m = len(self.modulator.modules)
        inv_scale = 1.0 / self.adapter.grad_scale()
        self.reducer.wait()
        self.reducer.free_send_buffers()  # the scratch below comes out of the same bucket budget
        acc = self.reducer.acc
        work = None if self.fused else workspace(min(self.adapter.local_numel, self.scratch_numel), acc.device)
        scaled = Split(*(x * inv_scale for x in self.estimator.split))  # fp16: unscale inside the pass
        rows, modules = [], []
        row = self.precondition
        for ch in self.adapter.chunks(second_moment=row.second_moment if row else None):
            g, s = ch.grad, acc[ch.lo:ch.hi]
            if row:
                gd = self.group_dicts[ch.group]
                pre = preconditioned_stats(g, s, scaled, ch.second_moment, row.beta2_of(gd), row.eps_of(gd), work)
                # the raw sums too, for the noise scale: one more pass over this chunk
                rows.append(torch.cat([pre, combine(gram(g, s, work), scaled)]))
            else:
                rows.append(gram(g, s, work))
            modules.append(ch.module)
        buffers = [*self.adapter.staging.values()] + ([] if work is None else [work])
        held = self.reducer.buffer_bytes() + sum(t.numel() * t.element_size() for t in buffers)
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, held)
        stats = torch.zeros(m, self._width, dtype=torch.float64, device=self.adapter.device)
        if mutations.active("rank_dropped") and self.world > 1 and self.rank == self.world - 1:
            rows, modules = [], []
        if not rows:
            return stats, torch.zeros((), dtype=torch.float64, device=stats.device)
        rows = torch.stack(rows)
        if not self.precondition:
            rows = combine(rows, scaled)
        if mutations.active("halves_swapped"):
            rows[:, 1] = rows[:, 2]
        # The chunk → module map is the same on every update step: copy it to the device once
        # (a host-to-device copy of a fresh list would stall the stream each time).
        if self._chunk_modules is None or self._chunk_modules[0] != modules:
            self._chunk_modules = (modules, torch.tensor(modules, device=stats.device))
        stats.index_add_(0, self._chunk_modules[1], rows)
        return stats, (~torch.isfinite(rows).all(dim=1)).sum(dtype=torch.float64)

    @property
    def _width(self) -> int:
        """Statistics per module in the all-reduce: 3, and 3 raw ones under preconditioning."""
        return 6 if self.precondition else 3

    @torch.no_grad()
    def _finish_step(self, update: bool):
        """On each accumulation boundary, after DeepSpeed's reduction, before its step.

        Update steps start the statistics all-reduce asynchronously: μ and the non-finite
        verdict are only needed by the optimizer step, so the wait lands in AGVM.step (or,
        when DeepSpeed skips the step, right after it), next to DeepSpeed's own norm
        all-reduce instead of adding a second synchronization point."""
        self._resolve()
        step = self._step()
        self._boundary_step = step
        self._step_nonfinite = False
        if update:
            m = len(self.modulator.modules)
            stats, bad = self._update_stats()
            self.reducer.release()
            local = torch.empty(m * self._width + 1, dtype=torch.float64, device=self.adapter.device)
            local[:-1] = stats.view(-1)
            local[-1] = bad
            work = dist.all_reduce(local, async_op=True) if self.world > 1 else None
            self._pending = (work, local, step)
            self._skip = None  # decided by _step_guard once the sums arrive
        elif self.cfg.skip_nonfinite and self.engine_check is not None:
            # DeepSpeed all-reduces a gradient norm on this step anyway: _step_guard reads it
            # at step time instead of paying for a pass and a collective here.
            self._skip = None
        elif self.cfg.skip_nonfinite:
            # Stage 0 (or no DeepSpeed norm): AGVM's own flag, computed and all-reduced on the
            # device here and read by the step guard, so the epilogue itself never syncs.
            sums = [t.sum(dtype=torch.float64) for t in self.adapter.grad_views()]
            flag = torch.zeros(1, dtype=torch.float64, device=self.adapter.device)
            if sums:
                flag += (~torch.isfinite(torch.stack(sums).sum())).to(torch.float64)
            work = dist.all_reduce(flag, async_op=True) if self.world > 1 else None
            self._pending_flag = (work, flag)
            self._skip = None  # decided by _step_guard
        else:
            self._skip = False

    def _resolve(self) -> bool | None:
        """Finish a pending update: wait for the summed statistics, then update μ (or count
        the skip). Returns whether a gradient was non-finite; None if nothing was pending."""
        if self._pending is None:
            return None
        work, local, step = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        m = len(self.modulator.modules)
        local = local.cpu()
        nonfinite = bool(local[-1] > 0)
        if nonfinite:
            self.modulator.skipped += 1
        if not nonfinite or mutations.active("skipped_counted"):
            table = local[:-1].view(m, self._width)
            for name, factor in (("pair_x1.01", 1.01), ("pair_x1.05", 1.05)):
                if mutations.active(name):
                    table[0, 0] *= factor
            self.modulator.update(step, table[:, :3], table[:, 3:] if self.precondition else None)
        return nonfinite

    def _resolve_flag(self) -> bool | None:
        """Read AGVM's own finiteness flag of this step (stage 0); None if none is pending."""
        if self._pending_flag is None:
            return None
        work, flag = self._pending_flag
        self._pending_flag = None
        if work is not None:
            work.wait()
        return bool(flag[0] > 0)

    def _step_guard(self) -> bool:
        """Asked through :meth:`skip_step` on the step's first call: complete μ, then say
        whether to skip."""
        nonfinite = self._resolve()
        own = self._resolve_flag()
        if nonfinite is None:
            nonfinite = own
        if nonfinite is None:
            nonfinite = bool(self.cfg.skip_nonfinite and self.engine_check is not None and self.engine_check())
        self._step_nonfinite = nonfinite
        return nonfinite and self.cfg.skip_nonfinite

    def _after_optimizer_step(self, engine_skipped: bool):
        """Count and report a step lost to a non-finite gradient, whoever caught it: AGVM's
        own check, AGVM.step asking DeepSpeed's norm, or DeepSpeed skipping by itself."""
        resolved = self._resolve()  # DeepSpeed skipped the step before AGVM.step could ask
        if self._resolve_flag() or resolved:
            self._step_nonfinite = True
        caught = self._skip is True or engine_skipped
        nonfinite = caught or self._step_nonfinite is True
        self._step_nonfinite = False
        if not nonfinite:
            return
        self.nonfinite_steps += 1
        if caught:
            self.skipped_steps += 1
        if self.rank == 0:
            log.warning("agvm: non-finite gradient at step %d: %s", self._step(),
                        "optimizer step skipped" if caught else "step NOT skipped")

    # -- checkpoint state -----------------------------------------------------------
    def state_dict(self) -> dict:
        """μ, the modulator state and the step counts: tensors and plain types only (the
        checkpoint files are loaded with ``weights_only=True``). A pending update is folded
        in first, so the saved μ is the one the last step used."""
        self._resolve()
        return {"modulator": self.modulator.state_dict(), "skipped_steps": self.skipped_steps,
                "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the step index follows the engine's restored counter."""
        self.modulator.load_state_dict(state["modulator"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self._boundary_step = None
