"""AGVM's statistics recomputed by brute force in float64, from the definitions only.

Used by :mod:`agvm_ds.selfcheck` (it ships to users) and by the conformance bench. Nothing
here reads :mod:`agvm_ds.core`: the halves, the preconditioning and μ are written again
from the paper's and the docs' definitions (docs/agvm.md), so a slip in the package's own
statistics code cannot hide in both.

Notation. ``u[(r, k)]`` is rank r's own gradient of micro-batch k of one step (what autograd
delivered inside ``engine.backward``, i.e. of ``loss / gas``, loss scale removed), a dict
parameter name → flat float64 tensor. DeepSpeed steps with G = Σ_{r,k} u[(r, k)] / world.
G1 / G2 are the means over each half at that same scale.
"""

from __future__ import annotations

import math

import torch


def _by_ranks(world: int, gas: int) -> tuple[list, list]:
    n1 = world // 2
    return ([(r, k) for r in range(n1) for k in range(gas)],
            [(r, k) for r in range(n1, world) for k in range(gas)])


def _by_micro(world: int, gas: int) -> tuple[list, list]:
    if gas < 2:  # one micro-batch per step: the split falls back to ranks
        return _by_ranks(world, gas)
    a1 = gas // 2
    return ([(r, k) for r in range(world) for k in range(a1)],
            [(r, k) for r in range(world) for k in range(a1, gas)])


#: ``agvm.estimator`` → its halves, written from the definitions (docs/agvm.md)
SPLITS = {"micro": _by_micro, "ranks": _by_ranks}


def halves(world: int, gas: int, estimator: str) -> tuple[list, list]:
    """The (rank, micro-batch) pairs of G1 and of G2. ``micro``: the first ⌊gas/2⌋
    micro-batches of every rank vs the rest; ``ranks`` (and ``micro`` at gas 1): the first
    ⌊world/2⌋ ranks vs the rest."""
    return SPLITS[estimator](world, gas)


def precondition(g: torch.Tensor, v: torch.Tensor, beta2: float, eps: float) -> torch.Tensor:
    """ĝ = g / (sqrt(β2·v + (1 − β2)·g²) + eps), v the optimizer's second moment before the step."""
    return g / (torch.sqrt(beta2 * v + (1 - beta2) * g * g) + eps)


def mean_over(u: dict, keys: list, names: list, gas: int) -> dict:
    return {n: sum(u[key][n] for key in keys) * (gas / len(keys)) for n in names}


def module_cos(G1: dict, G2: dict, owner: dict) -> dict:
    """cos(G1, G2) per module over all its elements (``owner``: parameter name → module)."""
    out = {}
    for m in dict.fromkeys(owner.values()):
        a = torch.cat([G1[n].reshape(-1) for n in owner if owner[n] == m])
        b = torch.cat([G2[n].reshape(-1) for n in owner if owner[n] == m])
        out[m] = float(a @ b / (a.norm() * b.norm()))
    return out


def cos_by_step(steps: dict, world: int, gas: int, estimator: str, owner: dict, adam=None,
                skipped=()) -> dict:
    """cos per module of every recorded step. ``steps[t] = u`` (see the module notes) for
    every step from 0 on. ``adam = (β2, eps)`` preconditions the halves with the second
    moment the optimizer holds before step t, rebuilt from the averaged gradients of the
    earlier steps; steps in ``skipped`` (DeepSpeed skipped them on overflow) neither update
    it nor get a cos."""
    h1, h2 = halves(world, gas, estimator)
    names = list(owner)
    v = {n: 0.0 for n in names}
    out = {}
    for t in sorted(steps):
        if t in skipped:
            continue
        u = steps[t]
        G1, G2 = mean_over(u, h1, names, gas), mean_over(u, h2, names, gas)
        if adam is not None:
            beta2, eps = adam
            G = mean_over(u, list(u), names, gas)
            G1 = {n: precondition(G1[n], v[n], beta2, eps) for n in names}
            G2 = {n: precondition(G2[n], v[n], beta2, eps) for n in names}
            v = {n: beta2 * v[n] + (1 - beta2) * G[n] ** 2 for n in names}
        out[t] = module_cos(G1, G2, owner)
    return out


def mu_by_step(cos: dict, modules: list, anchor: str, momentum: float, clamp=(0.5, 10.0),
               eps: float = 1e-6) -> dict:
    """μ after each step of ``cos`` (the update steps, in order): Φ = 1 − cos, r = √clamp((Φ_anchor
    + eps)/(Φ_m + eps)) (1 for the anchor), μ ← α·μ + (1 − α)·r, from μ = 1."""
    mu = {m: 1.0 for m in modules}
    out = {}
    for t in sorted(cos):
        phi = {m: 1.0 - c for m, c in cos[t].items()}
        for m in modules:
            ratio = min(max((phi[anchor] + eps) / (phi[m] + eps), clamp[0]), clamp[1])
            r = 1.0 if m == anchor else math.sqrt(ratio)
            mu[m] = momentum * mu[m] + (1 - momentum) * r
        out[t] = dict(mu)
    return out


def cos_error_bound(u: dict, world: int, gas: int, estimator: str, owner: dict, unit: float) -> dict:
    """|Δcos| per module that low-precision accumulation and reduction can cause (``unit``:
    the unit roundoff of the narrowest dtype gradients are summed in, 2^-9 for bf16).

    Every sum DeepSpeed forms of micro-step k's contributions (the accumulation over gas
    micro-batches, the reduction over world ranks) rounds each partial sum once, each
    rounding ≤ unit × the sum of magnitudes; so micro-step k's share of G is off by at most
    ε_k = 1.01·(world + gas)·unit·Σ_r‖u_rk‖ (2-norm, triangle inequality). A half formed
    from a snapshot of the running sum scales its share by gas/a; the bound takes the
    worst form, E = max(Σ_k ε_k, (gas/a1)·Σ_{k<a1} ε_k, (gas/a2)·Σ_{k≥a1} ε_k), and a
    vector turned by δ moves its angle by ≤ asin(‖δ‖/‖a‖), hence asin(E/‖G1‖) +
    asin(E/‖G2‖) (+1e-5 for fp32 sums). Not valid under Adam preconditioning (not linear)."""
    h1, h2 = halves(world, gas, estimator)
    a1 = max(1, gas // 2)
    out = {}
    for m in dict.fromkeys(owner.values()):
        vec = {key: torch.cat([g[n] for n in owner if owner[n] == m]) for key, g in u.items()}
        eps_k = [1.01 * (world + gas) * unit * sum(float(vec[(r, k)].norm()) for r in range(world))
                 for k in range(gas)]
        e = max(sum(eps_k), gas / a1 * sum(eps_k[:a1]), gas / max(1, gas - a1) * sum(eps_k[a1:]))
        g1 = float((sum(vec[key] for key in h1) * (gas / len(h1))).norm())
        g2 = float((sum(vec[key] for key in h2) * (gas / len(h2))).norm())
        out[m] = math.asin(min(1.0, e / max(g1, 1e-300))) + math.asin(min(1.0, e / max(g2, 1e-300))) + 1e-5
    return out
