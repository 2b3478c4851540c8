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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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

    def update(self, step: int, sums: torch.Tensor) -> bool:
        """Fold one measurement into μ; returns False (and counts a skip) if it was unusable."""
        out = self.ratios(sums)
        if out is None:
            self.skipped += 1
            return False
        cos, phi, raw = out
        new_mu = self.momentum * self.mu + (1.0 - self.momentum) * raw
        self.mu = torch.where(torch.isfinite(raw), new_mu, self.mu)
        self.updates += 1
        self.last_step = step
        self.last = {name: ModuleStats(float(cos[i]), float(phi[i]), float(self.mu[i]))
                     for i, name in enumerate(self.modules)}
        return True

    def multiplier(self, module: str, step: int) -> float:
        if not self.is_active(step):
            return 1.0
        return float(self.mu[self.modules.index(module)])

    def report(self) -> dict:
        """``{"step", "modules": {name: {"cos", "phi", "mu"}}}`` of the last update."""
        return {"step": self.last_step,
                "modules": {k: {"cos": v.cos, "phi": v.phi, "mu": v.mu} for k, v in self.last.items()}}

    def state_dict(self) -> dict:
        return {"modules": list(self.modules), "mu": self.mu.tolist(), "updates": self.updates,
                "skipped": self.skipped, "last_step": self.last_step, "last": self.report()["modules"]}

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


def stats_from_halves(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """``[<g1,g2>, |g1|², |g2|²]`` in float64 for two flat tensors (a reference helper)."""
    a, b = g1.double().reshape(-1), g2.double().reshape(-1)
    return torch.stack([torch.dot(a, b), torch.dot(a, a), torch.dot(b, b)])


def cosine(stats: torch.Tensor) -> float:
    s12, s11, s22 = (float(x) for x in stats)
    return s12 / math.sqrt(s11 * s22)
