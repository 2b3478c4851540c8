"""The AGVM modulator: per-module gradient statistics in, learning-rate multipliers μ out.

Pure tensor math, no torch.distributed (the estimators hand it globally summed statistics).

Algorithm (paper §3, Eq. 4–5; constants from the authors' release)::

    given, per module i, the sums  s12 = <G1, G2>,  s11 = |G1|^2,  s22 = |G2|^2
    c_i   = s12 / sqrt(s11 * s22)                      # cosine of the two half-batch grads
    Φ_i   = 1 - c_i                                    # η² cancels in every ratio
    r_i   = sqrt(clamp((Φ_a + ε) / (Φ_i + ε), lo, hi)) # a = anchor (backbone), r_a = 1
    μ_i  <- α μ_i + (1 - α) r_i                        # μ starts at 1

μ is updated every ``interval`` steps from ``start_step`` on. If any statistic is
non-finite, or the anchor's cosine is undefined (a zero norm), the whole update is skipped:
μ keeps its previous value and ``skipped`` is incremented. A NaN never enters μ. A module
with a zero norm (no gradient reached it this step) keeps its μ while the others update.

The same sums also give the gradient-noise scale of McCandlish et al. (2018), per module
and for the whole model (the sums over modules), once the halves' sample counts b1, b2 are
known (:meth:`Modulator.set_half_samples`; the estimator states them). G1, G2 are
independent means of b1, b2 per-sample gradients, so E⟨G1,G2⟩ = |G|² and
E|Gi|² = |G|² + tr(Σ)/bi::

    |G|²_est = s12,    tr(Σ)_est = (b1·(s11 − s12) + b2·(s22 − s12)) / 2     (both unbiased)
    B_noise  = EMA(tr Σ) / EMA(|G|²)                                          (momentum α)

Both EMAs start at zero and fold in the same updates, so their ratio needs no bias
correction (the factor 1 − αⁿ cancels). The raw estimates are smoothed as they are, signs
included (clipping them first would bias both); B_noise is None while either smoothed term
is ≤ 0 — the noise still swamps |G|² (or tr Σ), and no ratio of the two means anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class ModuleStats:
    cos: float
    phi: float
    mu: float


@dataclass
class Modulator:
    modules: list[str]
    anchor: str
    interval: int = 10
    momentum: float = 0.97
    start_step: int = 0
    clamp: tuple[float, float] = (0.5, 10.0)
    eps: float = 1e-6
    mu: torch.Tensor = field(init=False)
    updates: int = field(default=0, init=False)
    skipped: int = field(default=0, init=False)
    last_step: int = field(default=-1, init=False)
    last: dict = field(default_factory=dict, init=False)
    #: (b1, b2): samples averaged by G1 and G2; None leaves B_noise unmeasured.
    half_samples: Optional[tuple[int, int]] = field(default=None, init=False)
    #: ``[modules + 1, 2]`` float64: EMA(tr Σ), EMA(|G|²) per module, the whole model last.
    noise: torch.Tensor = field(init=False)

    def __post_init__(self):
        if not self.modules:
            raise ValueError("Modulator needs at least one module")
        if len(set(self.modules)) != len(self.modules):
            raise ValueError(f"duplicate module names: {self.modules}")
        if self.anchor not in self.modules:
            raise ValueError(f"anchor {self.anchor!r} is not one of the modules {self.modules}")
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")
        lo, hi = self.clamp
        if not 0 < lo <= hi:
            raise ValueError(f"clamp must satisfy 0 < lo <= hi, got {self.clamp}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        self.mu = torch.ones(len(self.modules), dtype=torch.float64)
        self.anchor_index = self.modules.index(self.anchor)
        self.noise = torch.zeros(len(self.modules) + 1, 2, dtype=torch.float64)

    def set_half_samples(self, b1: int, b2: int) -> None:
        """How many samples G1 and G2 average (from ``Estimator.half_samples``)."""
        if not (b1 >= 1 and b2 >= 1):
            raise ValueError(f"half sample counts must be >= 1, got {(b1, b2)}")
        self.half_samples = (int(b1), int(b2))

    def is_update_step(self, step: int) -> bool:
        """Whether the optimizer step numbered ``step`` (0-based) recomputes μ."""
        return step >= self.start_step and (step - self.start_step) % self.interval == 0

    def is_active(self, step: int) -> bool:
        """Whether μ scales the learning rates at ``step`` (from the start step on)."""
        return step >= self.start_step

    def ratios(self, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """cos, Φ and the raw multiplier r from an ``[modules, 3]`` tensor of sums.

        Returns None when any statistic is unusable (non-finite, or a zero norm).
        """
        sums = sums.to(torch.float64)
        if sums.shape != (len(self.modules), 3):
            raise ValueError(f"expected sums of shape {(len(self.modules), 3)}, got {tuple(sums.shape)}")
        s12, s11, s22 = sums.unbind(1)
        denom = torch.sqrt(s11 * s22)
        if not torch.isfinite(sums).all() or not denom[self.anchor_index] > 0:
            return None
        valid = denom > 0
        cos = torch.where(valid, s12 / denom.clamp_min(1e-300), torch.full_like(denom, float("nan"))).clamp(-1.0, 1.0)
        phi = 1.0 - cos
        lo, hi = self.clamp
        ratio = ((phi[self.anchor_index] + self.eps) / (phi + self.eps)).clamp(lo, hi)
        raw = ratio.sqrt()
        raw[self.anchor_index] = 1.0
        return cos, phi, raw

    def update(self, step: int, sums: torch.Tensor, noise_sums: Optional[torch.Tensor] = None) -> bool:
        """Fold one measurement into μ (and the noise-scale EMAs); returns False (and counts
        a skip) if it was unusable. ``noise_sums``: the ``[modules, 3]`` sums of the raw
        halves where ``sums`` are of preconditioned ones (default: ``sums``)."""
        out = self.ratios(sums)
        noise = None
        if out is not None and self.half_samples is not None:
            noise = noise_terms(sums if noise_sums is None else noise_sums, self.half_samples)
            if not torch.isfinite(noise).all():
                out = None
        if out is None:
            self.skipped += 1
            return False
        cos, phi, raw = out
        new_mu = self.momentum * self.mu + (1.0 - self.momentum) * raw
        self.mu = torch.where(torch.isfinite(raw), new_mu, self.mu)
        if noise is not None:
            # a module no gradient reached adds (0, 0): both EMAs shrink alike, its ratio stays
            self.noise = self.momentum * self.noise + (1.0 - self.momentum) * noise
        self.updates += 1
        self.last_step = step
        self.last = {name: ModuleStats(float(cos[i]), float(phi[i]), float(self.mu[i]))
                     for i, name in enumerate(self.modules)}
        return True

    def multiplier(self, module: str, step: int) -> float:
        if not self.is_active(step):
            return 1.0
        return float(self.mu[self.modules.index(module)])

    def b_noise(self) -> list[Optional[float]]:
        """The smoothed B_noise (samples) per module and, last, of the whole model; None where
        it is undefined (no measurement yet, or a smoothed term ≤ 0)."""
        return [float(t / g) if t > 0 and g > 0 else None for t, g in self.noise.tolist()]

    def report(self) -> dict:
        """``{"step", "modules": {name: {"cos", "phi", "mu", "b_noise"}}, "b_noise"}`` of the
        last update (the top-level ``b_noise``: the whole model's)."""
        *per_module, model = self.b_noise()
        b = dict(zip(self.modules, per_module))
        return {"step": self.last_step, "b_noise": model,
                "modules": {k: {"cos": v.cos, "phi": v.phi, "mu": v.mu, "b_noise": b[k]}
                            for k, v in self.last.items()}}

    def state_dict(self) -> dict:
        last = {k: {"cos": v.cos, "phi": v.phi, "mu": v.mu} for k, v in self.last.items()}
        return {"modules": list(self.modules), "mu": self.mu.tolist(), "updates": self.updates,
                "skipped": self.skipped, "last_step": self.last_step, "last": last,
                "noise": self.noise.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if list(state["modules"]) != list(self.modules):
            raise ValueError(f"checkpoint modules {state['modules']} differ from {self.modules}")
        mu = torch.tensor(state["mu"], dtype=torch.float64)
        if not torch.isfinite(mu).all():
            raise ValueError("checkpoint holds a non-finite μ")
        self.mu = mu
        self.updates = int(state["updates"])
        self.skipped = int(state["skipped"])
        self.last_step = int(state["last_step"])
        self.last = {k: ModuleStats(**v) for k, v in state.get("last", {}).items()}
        # A state written before the noise scale existed has none: it starts from zero, so
        # B_noise is the ratio of the EMAs of the updates after the load (still unbiased).
        noise = state.get("noise")
        shape = (len(self.modules) + 1, 2)
        noise = torch.zeros(shape, dtype=torch.float64) if noise is None else torch.tensor(noise, dtype=torch.float64)
        if noise.shape != shape or not torch.isfinite(noise).all():
            raise ValueError(f"checkpoint holds an unusable noise-scale state (shape {tuple(noise.shape)})")
        self.noise = noise


def noise_terms(sums: torch.Tensor, half_samples: tuple[int, int]) -> torch.Tensor:
    """``[modules + 1, 2]`` float64 (tr Σ_est, |G|²_est) from ``[modules, 3]`` sums
    (⟨G1,G2⟩, |G1|², |G2|²) of halves of b1, b2 samples; the last row is the whole model's
    (tr Σ and |G|² add over modules, so do the sums)."""
    sums = sums.to(torch.float64)
    rows = torch.cat([sums, sums.sum(0, keepdim=True)])
    s12, s11, s22 = rows.unbind(1)
    b1, b2 = half_samples
    trace = 0.5 * (b1 * (s11 - s12) + b2 * (s22 - s12))
    return torch.stack([trace, s12], dim=1)


def stats_from_halves(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """``[<g1,g2>, |g1|², |g2|²]`` in float64 for two flat tensors (a reference helper)."""
    a, b = g1.double().reshape(-1), g2.double().reshape(-1)
    return torch.stack([torch.dot(a, b), torch.dot(a, a), torch.dot(b, b)])

