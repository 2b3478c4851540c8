"""LAMB with whole-tensor trust ratios under every ZeRO stage."""

from __future__ import annotations

from typing import Optional

import torch

from agvm_ds.errors import ConfigError
from agvm_ds.optim.layerwise import LayerwiseOptimizerMixin


class Lamb(LayerwiseOptimizerMixin, torch.optim.Optimizer):
    r"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT
    in 76 minutes"), the NVLAMB variant of timm's ``Lamb`` / apex's ``FusedLAMB``.

    For every tensor ``w`` with gradient ``g`` at step ``t`` (per tensor, ``b₁, b₂ = betas``,
    ``b₃ = 1 - b₁`` with ``grad_averaging`` else 1)::

        m ← b₁ m + b₃ g                         v ← b₂ v + (1 - b₂) g²
        u ← (m / c₁) / (√v / √c₂ + eps)          c₁, c₂ = 1 - b₁ᵗ, 1 - b₂ᵗ (1, 1 without bias_correction)
        if weight_decay ≠ 0:
            decoupled_decay:  w ← w - s · weight_decay · w   (s = lr, or lr² / max_lr with corrected_weight_decay)
            else:             u ← u + weight_decay · w
        if weight_decay ≠ 0 or always_adapt:
            r ← ‖w‖ / ‖u‖  (1 when either norm is 0);  r ← min(r, 1) with trust_clip
            u ← r · u
        w ← w - lr · u

    ``‖w‖`` and ``‖u‖`` are norms over the *whole* parameter even when this optimizer is
    handed flat ZeRO partitions: see :mod:`agvm_ds.optim.layerwise` (one all-reduce of a
    ``[tensors × 2]`` float64 table per ``step()`` call under ZeRO, none at stage 0).

    Global-norm gradient clipping is **not** done here (timm's ``max_grad_norm``): under ZeRO
    a rank sees only its partition, so the norm would be wrong. Use DeepSpeed's top-level
    ``"gradient_clipping"``, which clips by the exact global norm over all ranks before this
    step; passing ``max_grad_norm`` other than ``None`` raises. The step count is kept per
    stepped tensor (``state["step"]``), so ZeRO-3's several sub-groups of one param group
    each count one step per optimizer step.
    """

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True, betas=(0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, grad_averaging: bool = True,
                 max_grad_norm: Optional[float] = None, trust_clip: bool = False, always_adapt: bool = False,
                 decoupled_decay: bool = False, corrected_weight_decay: bool = False, caution: bool = False):
        if max_grad_norm is not None:
            raise ConfigError("optimizer.params.max_grad_norm: Lamb does not clip inside the optimizer (under "
                             "ZeRO it would see one partition); set DeepSpeed's top-level \"gradient_clipping\" "
                             "instead (exact global norm over all ranks)")
        if caution:
            raise ConfigError("optimizer.params.caution: cautious LAMB is not supported")
        if not 0.0 <= lr:
            raise ConfigError(f"optimizer.params.lr: must be >= 0, got {lr}")
        if not 0.0 <= eps:
            raise ConfigError(f"optimizer.params.eps: must be >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"optimizer.params.betas: two values in [0, 1), got {betas}")
        if not 0.0 <= weight_decay:
            raise ConfigError(f"optimizer.params.weight_decay: must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, grad_averaging=grad_averaging, trust_clip=trust_clip,
                        always_adapt=always_adapt, decoupled_decay=decoupled_decay,
                        corrected_weight_decay=corrected_weight_decay, max_lr=lr)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        adapt_p, adapt_u, adapt_groups = [], [], []  # (group, first, end) into the adapt lists
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            first = len(adapt_p)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                c1, c2 = (1.0 - beta1 ** t, 1.0 - beta2 ** t) if group["bias_correction"] else (1.0, 1.0)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=beta3)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                u = (m / c1).div_((v.sqrt() / c2 ** 0.5).add_(eps))
                if wd != 0:
                    if group["decoupled_decay"]:
                        scale = lr ** 2 / group["max_lr"] if group["corrected_weight_decay"] else lr
                        p.mul_(1.0 - scale * wd)
                    else:
                        u.add_(p, alpha=wd)
                if wd != 0 or group["always_adapt"]:
                    adapt_p.append(p)
                    adapt_u.append(u)
                else:
                    p.add_(u, alpha=-lr)
            if len(adapt_p) > first:
                adapt_groups.append((group, first, len(adapt_p)))
        if adapt_p:
            self._adapt(adapt_p, adapt_u, adapt_groups)
        return loss

    def _adapt(self, params, updates, groups):
        # All trust ratios of this call from one [slots × 2] table: one collective under ZeRO.
        plan = self._plan(params)
        table = plan.squared_norms([params, updates])
        w, u = table[:, 0].sqrt(), table[:, 1].sqrt()
        ratio = torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w))
        step = torch.empty_like(ratio)
        for group, first, end in groups:
            lo, hi = plan.slot_range[first][0], plan.slot_range[end - 1][1]
            r = ratio[lo:hi].clamp(max=1.0) if group["trust_clip"] else ratio[lo:hi]
            step[lo:hi] = r * -group["lr"]
        torch._foreach_addcmul_(plan.views(params), plan.views(updates), plan.per_run(step.to(params[0].dtype)))
