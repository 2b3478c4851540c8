"""Stage 0: DeepSpeed keeps the whole averaged gradient on every rank (``p.grad``)."""

from __future__ import annotations

import torch

from agvm_ds.core.adapters.base import StageAdapter
from agvm_ds.core.chunks import Chunk


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
