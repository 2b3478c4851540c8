"""LARS / LARC with whole-tensor trust ratios under every ZeRO stage."""

from __future__ import annotations

import torch

from agvm_ds.errors import ConfigError
from agvm_ds.optim.layerwise import LayerwiseOptimizerMixin


class Lars(LayerwiseOptimizerMixin, torch.optim.Optimizer):
    r"""LARS (You et al., 2017, "Large Batch Training of Convolutional Networks") with
    optional LARC clipping, the semantics of timm's ``Lars`` (SGD + apex's LARC).

    For every tensor ``w`` with gradient ``g``::

        if weight_decay ≠ 0 or always_adapt:
            r ← trust_coeff · ‖w‖ / (‖g‖ + weight_decay · ‖w‖ + eps)   (1 when ‖w‖ or ‖g‖ is 0)
            r ← min(r / lr, 1) with trust_clip (LARC)
            d ← r · (g + weight_decay · w)
        else:
            d ← g
        if momentum ≠ 0:
            b ← d on the first step, else momentum · b + (1 - dampening) · d
            d ← d + momentum · b with nesterov, else b
        w ← w - lr · d

    ``‖w‖`` and ``‖g‖`` are norms over the *whole* parameter even when this optimizer is
    handed flat ZeRO partitions: see :mod:`agvm_ds.optim.layerwise` (one all-reduce of a
    ``[tensors × 2]`` float64 table per ``step()`` call under ZeRO, none at stage 0).
    """

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, trust_coeff: float = 0.001,
                 eps: float = 1e-8, trust_clip: bool = False, always_adapt: bool = False):
        if not 0.0 <= lr:
            raise ConfigError(f"optimizer.params.lr: must be >= 0, got {lr}")
        if not 0.0 <= momentum:
            raise ConfigError(f"optimizer.params.momentum: must be >= 0, got {momentum}")
        if not 0.0 <= weight_decay:
            raise ConfigError(f"optimizer.params.weight_decay: must be >= 0, got {weight_decay}")
        if not 0.0 <= dampening <= 1.0:
            raise ConfigError(f"optimizer.params.dampening: must be in [0, 1], got {dampening}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError("optimizer.params.nesterov: needs momentum > 0 and dampening 0")
        if not 0.0 < trust_coeff:
            raise ConfigError(f"optimizer.params.trust_coeff: must be > 0, got {trust_coeff}")
        if not 0.0 <= eps:
            raise ConfigError(f"optimizer.params.eps: must be >= 0, got {eps}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip,
                        always_adapt=always_adapt)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        steps = []  # (group, params, directions), the directions still to be scaled when adapting
        adapt_p, adapt_g, adapt_groups = [], [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Lars does not support sparse gradients")
            wd = group["weight_decay"]
            if wd != 0 or group["always_adapt"]:
                first = len(adapt_p)
                adapt_p.extend(params)
                adapt_g.extend(p.grad for p in params)
                adapt_groups.append((group, first, len(adapt_p)))
                # Not in place: p.grad stays the gradient DeepSpeed handed over.
                dirs = [p.grad.add(p, alpha=wd) for p in params]
            else:
                dirs = [p.grad for p in params]
            steps.append((group, params, dirs))
        if adapt_p:
            # Ratios from ‖w‖, ‖g‖ before any update; one collective for the whole call.
            plan = self._plan(adapt_p)
            ratio = self._ratios(plan, plan.squared_norms([adapt_p, adapt_g]), adapt_groups)
            scaled = [d for group, _, dirs in steps
                      if group["weight_decay"] != 0 or group["always_adapt"] for d in dirs]
            torch._foreach_mul_(plan.views(scaled), plan.per_run(ratio.to(adapt_p[0].dtype)))
        for group, params, dirs in steps:
            self._momentum_step(group, params, dirs)
        return loss

    @staticmethod
    def _ratios(plan, table, groups) -> torch.Tensor:
        w, g = table[:, 0].sqrt(), table[:, 1].sqrt()
        ratio = torch.ones_like(w)
        for group, first, end in groups:
            lo, hi = plan.slot_range[first][0], plan.slot_range[end - 1][1]
            wn, gn = w[lo:hi], g[lo:hi]
            r = group["trust_coeff"] * wn / (gn + wn * group["weight_decay"] + group["eps"])
            r = torch.where((wn > 0) & (gn > 0), r, torch.ones_like(r))
            if group["trust_clip"]:
                r = (r / group["lr"]).clamp(max=1.0)
            ratio[lo:hi] = r
        return ratio

    def _momentum_step(self, group, params, dirs):
        mom, lr = group["momentum"], group["lr"]
        for p, d in zip(params, dirs):
            if mom != 0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.detach().clone()
                else:
                    buf.mul_(mom).add_(d, alpha=1.0 - group["dampening"])
                d = d.add(buf, alpha=mom) if group["nesterov"] else buf
            p.add_(d, alpha=-lr)
