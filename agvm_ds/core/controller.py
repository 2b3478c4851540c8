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
  boundary reduction.

With A = 1 ``micro`` has no halves to compare: it uses the ``ranks`` split when N ≥ 2 and
refuses to start on a single rank.

On each accumulation boundary, after DeepSpeed's reduction and before any clipping, every
rank sums ⟨G1,G2⟩, |G1|², |G2|² (Adam-preconditioned when asked) over the elements it
owns, per module, and one all-reduce of a float64 ``[modules × 3 + 1]`` tensor finishes the
job; the extra slot counts non-finite gradients. A non-finite gradient anywhere skips the
optimizer step on every rank and leaves μ unchanged, in every precision.

Limitations:
    The streamed reductions are synchronous (fine on CPU/gloo; on GPUs they serialize with
    the backward pass on update steps only). Pipeline and tensor parallelism are not
    handled: the data-parallel group is assumed to be the world.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from agvm_ds.config.agvm import AGVMConfig
from agvm_ds.core.adapters import build_adapter, install_engine_hooks
from agvm_ds.core.modulator import Modulator
from agvm_ds.core.optimizer import AGVM
from agvm_ds.core.reducer import OwnerReducer

log = logging.getLogger("agvm_ds")


def _precondition(g: torch.Tensor, v: torch.Tensor | None, beta2: float, eps: float) -> torch.Tensor:
    """ĝ = g / (sqrt(β2·v + (1 − β2)·g²) + eps), as in the authors' release (no bias correction)."""
    second = (1.0 - beta2) * g * g
    if v is not None:
        second = second + beta2 * v
    return g / (second.sqrt() + eps)


class AGVMController:
    def __init__(self, engine, optimizer: AGVM, modulator: Modulator, cfg: AGVMConfig,
                 groups: list[list[torch.nn.Parameter]], group_dicts: list[dict], precondition: bool):
        self.engine = engine
        self.optimizer = optimizer
        self.modulator = modulator
        self.cfg = cfg
        self.group_dicts = group_dicts
        self.precondition = precondition
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
        self.reducer = OwnerReducer(self.adapter.layout, self.rank, self.world, cfg.bucket_size)
        self._hook_handles: list = []
        self.nonfinite_steps = 0
        install_engine_hooks(engine, self._after_backward, self._before_reduction)
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
        self.reducer.start(self.adapter.local_numel)
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
        self.reducer.start(self.adapter.local_numel)
        for p in self.params:
            self.reducer.add(p, self.adapter.local_unreduced_grad(p), coeff)
        self.reducer.flush()

    def _after_backward(self):
        update = self._is_update()
        boundary = self.engine.is_gradient_accumulation_boundary()
        if update and self._hook_handles:
            self.reducer.flush()
        if update and self.estimator == "micro" and not boundary and self._micro_index() == self.a1 - 1:
            if self.adapter.reduces_every_micro_step:
                self.reducer.start(self.adapter.local_numel)
                for ch in self.adapter.chunks(boundary=False):
                    self.reducer.acc[ch.lo:ch.hi].copy_(ch.grad)
            else:
                self._stream_local(1.0 / self.world)
        if boundary:
            self._disarm()
            self._finish_step(update)

    @torch.no_grad()
    def _finish_step(self, update: bool):
        step = self._step()
        m = len(self.modulator.modules)
        local = torch.zeros(m * 3 + 1, dtype=torch.float64)
        inv_scale = 1.0 / self.adapter.grad_scale()
        if update:
            acc = self.reducer.acc
            for ch in self.adapter.chunks(want_second_moment=self.precondition, boundary=True):
                g = ch.grad if inv_scale == 1.0 else ch.grad * inv_scale
                if not torch.isfinite(g.sum(dtype=torch.float64)):
                    local[-1] += 1
                    continue
                s = acc[ch.lo:ch.hi] if inv_scale == 1.0 else acc[ch.lo:ch.hi] * inv_scale
                if self.estimator == "micro":
                    g1 = s * (self.A / self.a1)
                    g2 = (g - s) * (self.A / (self.A - self.a1))
                else:
                    g1 = g + ((self.world - self.n1) / self.world) * s
                    g2 = g - (self.n1 / self.world) * s
                if self.precondition:
                    gd = self.group_dicts[ch.group]
                    beta2, eps = float(gd["betas"][1]), float(gd["eps"])
                    g1 = _precondition(g1, ch.second_moment, beta2, eps)
                    g2 = _precondition(g2, ch.second_moment, beta2, eps)
                g1, g2 = g1.double(), g2.double()
                i = ch.module * 3
                local[i] += torch.dot(g1, g2)
                local[i + 1] += torch.dot(g1, g1)
                local[i + 2] += torch.dot(g2, g2)
            self.reducer.release()
        elif self.cfg.skip_nonfinite:
            sums = [t.sum(dtype=torch.float64) for t in self.adapter.grad_views()]
            if sums and not torch.isfinite(torch.stack(sums).sum()):
                local[-1] += 1
        if self.world > 1 and (update or self.cfg.skip_nonfinite):
            if update:
                dist.all_reduce(local)
            else:
                flag = local[-1:].clone()
                dist.all_reduce(flag)
                local[-1] = flag[0]
        nonfinite = bool(local[-1] > 0)
        if nonfinite:
            self.nonfinite_steps += 1
            if self.rank == 0:
                log.warning("agvm: non-finite gradient at step %d: %s", step,
                            "optimizer step skipped" if self.cfg.skip_nonfinite else "step NOT skipped")
        self.optimizer.skip_next_step = nonfinite and self.cfg.skip_nonfinite
        if self.optimizer.skip_next_step:
            self.optimizer.skipped_steps += 1
        if update:
            if nonfinite:
                self.modulator.skipped += 1
            else:
                self.modulator.update(step, local[:-1].view(m, 3))
        self.optimizer.step_index = step

    # -- checkpoint state -----------------------------------------------------------
    def state_dict(self) -> dict:
        return {"modulator": self.modulator.state_dict(), "skipped_steps": self.optimizer.skipped_steps,
                "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict) -> None:
        self.modulator.load_state_dict(state["modulator"])
        self.optimizer.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.optimizer.step_index = int(self.engine.global_steps)
