"""Measure per-module gradient statistics inside a DeepSpeed engine and drive μ.

Estimators (design.md §2), with A = gradient_accumulation_steps and N = ranks:

* ``micro``: G1 = mean gradient of the first a1 = ⌊A/2⌋ micro-batches (all ranks), G2 of
  the last a2 = A − a1. ZeRO-2/3 already hold the reduced running sum after micro-step a1,
  so this rank copies its owned P/N elements (no extra traffic). ZeRO-0/1 reduce only at
  the boundary; their local running sums are streamed to the owners once (one extra
  reduction of P on update steps).
* ``ranks``: G1 = mean over ranks [0, n1), G2 over [n1, N), n1 = ⌊N/2⌋ (the halves differ
  by one rank when N is odd). Every rank streams ``c_r · g_r`` (c = +1/n1 or −1/n2) to the
  owners, giving S = G1 − G2 on each owner; then G1 = G + (n2/N)·S, G2 = G − (n1/N)·S. Under
  ZeRO-2/3 the stream runs from tensor hooks during the update step's backward passes
  (one bucket + P/N memory); under ZeRO-0/1 from the local sums just before DeepSpeed's
  boundary reduction. The stream goes out in ZeRO-shaped buckets (:mod:`agvm_ds.core.reducer`):
  one reduce-scatter per bucket where the bucket's owners are all ranks in about equal
  shares, else one reduce per owner the bucket touches — about P/bucket + N collectives and
  P elements per micro-step, the bucket defaulting to ZeRO's ``reduce_bucket_size``.

With A = 1 ``micro`` has no halves to compare: it uses the ``ranks`` split when N ≥ 2 and
refuses to start on a single rank.

On each accumulation boundary, after DeepSpeed's reduction and before any clipping, every
rank sums ⟨G1,G2⟩, |G1|², |G2|² (Adam-preconditioned when asked) over the elements it
owns, per module (:mod:`agvm_ds.core.statistics`), and one asynchronous all-reduce of a
float64 ``[modules × 3 + 1]`` tensor finishes the job; the extra slot counts chunks with a
non-finite value. The all-reduce is waited for where μ is first needed: on the optimizer
step's first call (``AGVM.step`` asks :meth:`AGVMController._step_guard`).

A non-finite gradient anywhere skips the optimizer step on every rank and leaves μ
unchanged, in every precision. On update steps the statistics reveal it; on other steps,
under ZeRO-1/2/3, the step guard reads the global gradient norm DeepSpeed all-reduces
anyway (stage 0 and ``compute_grad_norm: false`` check the owned gradient themselves).

Limitations:
    The signed stream of ``ranks`` costs one extra gradient reduction per micro-step of an
    update step (fp32, asynchronous, overlapping the backward pass). Pipeline and tensor
    parallelism are not handled: the data-parallel group is assumed to be the world.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist

from agvm_ds.config.agvm import AGVMConfig
from agvm_ds.core import native
from agvm_ds.core.adapters import build_adapter, install_engine_hooks
from agvm_ds.core.modulator import Modulator
from agvm_ds.core.optimizer import AGVM
from agvm_ds.core.reducer import OwnerReducer, default_bucket_size
from agvm_ds.core.statistics import (BLOCK, SLICE, Split, combine, gram, preconditioned_stats,
                                     split_coefficients, workspace)
from agvm_ds.optim.registry import OptimizerInfo

log = logging.getLogger("agvm_ds")


class AGVMController:
    def __init__(self, engine, optimizer: AGVM, modulator: Modulator, cfg: AGVMConfig,
                 groups: list[list[torch.nn.Parameter]], group_dicts: list[dict],
                 precondition: Optional[OptimizerInfo]):
        """``precondition``: the base's registry row when Φ is taken on Adam-preconditioned
        halves (its ``second_moment`` state, ``beta2`` and ``eps`` are read), else None."""
        self.engine = engine
        self.optimizer = optimizer
        self.modulator = modulator
        self.cfg = cfg
        self.group_dicts = group_dicts
        self.precondition = precondition
        optimizer.groups_frozen = True  # the groups below are the ones measured
        group_modules = [modulator.modules.index(g["module"]) for g in group_dicts]
        self.adapter = build_adapter(engine, groups, group_modules)
        self.params = self.adapter.params
        self.rank, self.world = self.adapter.rank, self.adapter.world
        self.A = int(engine.gradient_accumulation_steps())
        self.estimator = cfg.estimator
        if self.estimator == "micro" and self.A < 2:
            if self.world < 2:
                raise ValueError("agvm.estimator: 'micro' needs gradient_accumulation_steps >= 2 on a single "
                                 "rank (there is only one micro-batch to compare)")
            self.estimator = "ranks"
            if self.rank == 0:
                log.warning("agvm: gradient_accumulation_steps=1, so the 'micro' estimator splits by ranks")
        if self.estimator == "ranks" and self.world < 2:
            raise ValueError("agvm.estimator: 'ranks' needs at least 2 data-parallel ranks")
        self.a1 = self.A // 2
        self.n1 = self.world // 2
        self.coeff = (1.0 / self.n1) if self.rank < self.n1 else (-1.0 / (self.world - self.n1)) \
            if self.world > 1 else 0.0
        self.split = split_coefficients(self.estimator, self.A, self.a1, self.world, self.n1)
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
        self._hook_handles: list = []
        self.nonfinite_steps = 0
        self._step_nonfinite = False
        self._pending = None  # (all-reduce work, stats tensor, step) of an update in flight
        self._pending_flag = None  # (all-reduce work, flag) of AGVM's own finiteness check
        self._chunk_modules = None  # (list, device copy) of the statistics pass's chunk → module map
        self.peak_buffer_bytes = 0  # AGVM's own buffers at the statistics pass, largest so far
        # Where DeepSpeed already all-reduces a gradient norm every step, plain steps read it
        # (at step time, through AGVM.step) instead of running a check of their own.
        self.engine_check = self.adapter.engine_nonfinite_check()
        optimizer.step_guard = self._step_guard
        install_engine_hooks(engine, self._after_backward, self._before_reduction, self._after_optimizer_step,
                             self.adapter.engine_skipped_step)
        if self.estimator == "ranks" and self.adapter.reduces_every_micro_step:
            engine.module.register_forward_pre_hook(self._on_forward)

    # -- step bookkeeping ------------------------------------------------------------
    def _step(self) -> int:
        return int(self.engine.global_steps)

    def _micro_index(self) -> int:
        return int(self.engine.micro_steps) % self.A

    def _is_update(self) -> bool:
        return self.modulator.is_update_step(self._step())

    # -- ranks under ZeRO-2/3: stream from tensor hooks --------------------------------
    def _on_forward(self, module, args):
        if self._hook_handles or not module.training or not torch.is_grad_enabled() or not self._is_update():
            return
        self.reducer.start(self.adapter.local_numel, self.adapter.device)
        for p in self.params:
            self._hook_handles.append(p.register_hook(self._make_hook(p)))

    def _make_hook(self, p):
        def hook(grad):
            self.reducer.add(p, grad, self.coeff)
        return hook

    def _disarm(self):
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()

    # -- engine callbacks -----------------------------------------------------------
    def _before_reduction(self):
        """Stages 0/1, inside the engine's epilogue, before DeepSpeed's own reduction."""
        if self.adapter.reduces_every_micro_step or self.estimator != "ranks":
            return
        if not (self.engine.is_gradient_accumulation_boundary() and self._is_update()):
            return
        self._stream_local(self.coeff)

    def _stream_local(self, coeff: float):
        self.reducer.start(self.adapter.local_numel, self.adapter.device)
        for p in self.params:
            self.reducer.add(p, self.adapter.local_unreduced_grad(p), coeff)
        self.reducer.flush()  # completes by the boundary (reducer.wait in _update_stats)

    def _after_backward(self):
        update = self._is_update()
        boundary = self.engine.is_gradient_accumulation_boundary()
        if update and self._hook_handles:
            self.reducer.flush()
        if update and self.estimator == "micro" and not boundary and self._micro_index() == self.a1 - 1:
            if self.adapter.reduces_every_micro_step:
                self.reducer.start(self.adapter.local_numel, self.adapter.device, zero=False)
                self.adapter.copy_owned_grad(self.reducer.acc)
            else:
                self._stream_local(1.0 / self.world)
        if boundary:
            self._disarm()
            self._finish_step(update)

    @torch.no_grad()
    def _update_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's float64 ``[modules, 3]`` share of ⟨G1,G2⟩, |G1|², |G2|² and how many
        of its chunks hold a non-finite value (a device scalar: no host sync here)."""
        m = len(self.modulator.modules)
        inv_scale = 1.0 / self.adapter.grad_scale()
        self.reducer.wait()
        self.reducer.free_send_buffers()  # the scratch below comes out of the same bucket budget
        acc = self.reducer.acc
        work = None if self.fused else workspace(min(self.adapter.local_numel, self.scratch_numel), acc.device)
        scaled = Split(*(x * inv_scale for x in self.split))  # fp16: unscale inside the pass
        rows, modules = [], []
        row = self.precondition
        for ch in self.adapter.chunks(second_moment=row.second_moment if row else None):
            g, s = ch.grad, acc[ch.lo:ch.hi]
            if row:
                gd = self.group_dicts[ch.group]
                rows.append(preconditioned_stats(g, s, scaled, ch.second_moment,
                                                 row.beta2_of(gd), row.eps_of(gd), work))
            else:
                rows.append(gram(g, s, work))
            modules.append(ch.module)
        buffers = [*self.adapter.staging.values()] + ([] if work is None else [work])
        held = self.reducer.buffer_bytes() + sum(t.numel() * t.element_size() for t in buffers)
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, held)
        stats = torch.zeros(m, 3, dtype=torch.float64, device=self.adapter.device)
        if not rows:
            return stats, torch.zeros((), dtype=torch.float64, device=stats.device)
        rows = torch.stack(rows)
        if not self.precondition:
            rows = combine(rows, scaled)
        # The chunk → module map is the same on every update step: copy it to the device once
        # (a host-to-device copy of a fresh list would stall the stream each time).
        if self._chunk_modules is None or self._chunk_modules[0] != modules:
            self._chunk_modules = (modules, torch.tensor(modules, device=stats.device))
        stats.index_add_(0, self._chunk_modules[1], rows)
        return stats, (~torch.isfinite(rows).all(dim=1)).sum(dtype=torch.float64)

    @torch.no_grad()
    def _finish_step(self, update: bool):
        """On each accumulation boundary, after DeepSpeed's reduction, before its step.

        Update steps start the statistics all-reduce asynchronously: μ and the non-finite
        verdict are only needed by the optimizer step, so the wait lands in AGVM.step (or,
        when DeepSpeed skips the step, right after it), next to DeepSpeed's own norm
        all-reduce instead of adding a second synchronization point."""
        self._resolve()
        step = self._step()
        self.optimizer.step_index = step
        self._step_nonfinite = False
        if update:
            m = len(self.modulator.modules)
            stats, bad = self._update_stats()
            self.reducer.release()
            local = torch.empty(m * 3 + 1, dtype=torch.float64, device=self.adapter.device)
            local[:-1] = stats.view(-1)
            local[-1] = bad
            work = dist.all_reduce(local, async_op=True) if self.world > 1 else None
            self._pending = (work, local, step)
            self.optimizer.skip_next_step = None  # decided by _step_guard once the sums arrive
        elif self.cfg.skip_nonfinite and self.engine_check is not None:
            # DeepSpeed all-reduces a gradient norm on this step anyway: _step_guard reads it
            # at step time instead of paying for a pass and a collective here.
            self.optimizer.skip_next_step = None
        elif self.cfg.skip_nonfinite:
            # Stage 0 (or no DeepSpeed norm): AGVM's own flag, computed and all-reduced on the
            # device here and read by the step guard, so the epilogue itself never syncs.
            sums = [t.sum(dtype=torch.float64) for t in self.adapter.grad_views()]
            flag = torch.zeros(1, dtype=torch.float64, device=self.adapter.device)
            if sums:
                flag += (~torch.isfinite(torch.stack(sums).sum())).to(torch.float64)
            work = dist.all_reduce(flag, async_op=True) if self.world > 1 else None
            self._pending_flag = (work, flag)
            self.optimizer.skip_next_step = None  # decided by _step_guard
        else:
            self.optimizer.skip_next_step = False

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
        else:
            self.modulator.update(step, local[:-1].view(m, 3))
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
        """Asked by AGVM.step on the step's first call: complete μ, then say whether to skip."""
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
        caught = self.optimizer.skip_next_step is True or engine_skipped
        nonfinite = caught or self._step_nonfinite is True
        self._step_nonfinite = False
        if not nonfinite:
            return
        self.nonfinite_steps += 1
        if caught:
            self.optimizer.skipped_steps += 1
        if self.rank == 0:
            log.warning("agvm: non-finite gradient at step %d: %s", self._step(),
                        "optimizer step skipped" if caught else "step NOT skipped")

    # -- checkpoint state -----------------------------------------------------------
    def state_dict(self) -> dict:
        self._resolve()
        return {"modulator": self.modulator.state_dict(), "skipped_steps": self.optimizer.skipped_steps,
                "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict) -> None:
        self.modulator.load_state_dict(state["modulator"])
        self.optimizer.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.optimizer.step_index = int(self.engine.global_steps)
