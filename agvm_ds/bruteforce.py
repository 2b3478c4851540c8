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

COS_TOL, GRAD_TOL = 1e-4, 1e-5  # where every sum is fp32: relative


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
SPLITS = {"micro": _by_micro, "ranks": _by_ranks, "auto": _by_micro}  # auto: micro, by ranks at GAS 1


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


def compare(allsteps, plain, ds_grads, reports, skipped, world, gas, estimator, owner, anchor, agvm, adam,
            unit, steps) -> list[tuple[bool, float, str]]:
    """The self-check's verdicts as (ok, worst error, line): (b) ``ds_grads[t]`` (DeepSpeed's
    averaged gradients, by name) against ``plain[t]`` (a plain all-reduce of the recorded
    gradients); (a) ``reports[t] = (cos by module, μ by module, AGVM's step)`` against
    :func:`cos_by_step` / :func:`mu_by_step` of ``allsteps`` (see the module notes). ``unit``:
    the unit roundoff of low-precision sums on the path (0: all fp32)."""
    out = []
    # (b) DeepSpeed's reduction against a plain all-reduce of the same micro-batches
    worst, bound_b, missing = 0.0, GRAD_TOL, []
    for t in sorted(ds_grads):
        if t in skipped:
            continue
        for m in dict.fromkeys(owner.values()):
            ns = [n for n in owner if owner[n] == m]
            if any(ds_grads[t][n] is None for n in ns):
                missing.append(m)
                continue
            a = torch.cat([ds_grads[t][n].to(plain[t][n].device) for n in ns])
            b = torch.cat([plain[t][n] for n in ns])
            worst = max(worst, float((a - b).norm() / b.norm()))
            if unit:
                mags = sum(float(torch.cat([allsteps[t][(r, k)][n] for n in ns]).norm())
                           for r in range(world) for k in range(gas))
                bound_b = max(bound_b, 1.01 * (world + gas) * unit * mags / world / float(b.norm()) + GRAD_TOL)
    ok = not missing and worst <= bound_b and math.isfinite(worst)
    out.append((ok, worst, f"DeepSpeed averaged gradients vs plain all_reduce: worst rel err {worst:.1e} "
                    f"(tol {bound_b:.1e})" + (f"; no gradient readable for {sorted(set(missing))}" if missing else "")))
    # (a) AGVM's cos and μ against the float64 brute force
    upd = {t for t in range(1, steps) if t not in skipped}
    ref = cos_by_step(allsteps, world, gas, estimator, owner, adam=adam, skipped=skipped)
    ref = {t: c for t, c in ref.items() if t in upd}
    modules = list(dict.fromkeys(owner.values()))
    bounds = {t: (cos_error_bound(allsteps[t], world, gas, estimator, owner, unit) if unit else None) for t in ref}
    worst, tightest, bad_step, no_update = 0.0, math.inf, [], []
    for t, cs in ref.items():
        got, _, step = reports[t]
        for m, c in cs.items():
            if unit:  # absolute error against the low-precision bound
                err, tol = abs(got.get(m, math.nan) - c), bounds[t][m]
                tightest = min(tightest, tol)
            else:
                err, tol = abs(got.get(m, math.nan) - c) / max(abs(c), 1e-3), COS_TOL
            worst = max(worst, err) if math.isfinite(err) else math.inf
            if step != t or not err <= tol:
                bad_step.append(t)
        if step != t:
            no_update.append(t)
    what = "preconditioned " if adam else ""
    figure = (f"worst abs err {worst:.1e} (tol: low-precision bound per module, smallest {tightest:.1e})" if unit
              else f"worst rel err {worst:.1e} (tol {COS_TOL:.0e})")
    split = f"{estimator}, split by ranks at GAS 1" if SPLITS[estimator] is not _by_ranks and gas < 2 else estimator
    out.append((not bad_step and bool(ref), worst, f"AGVM {what}cos vs float64 brute force ({split}, {len(ref)} updates): "
                f"{figure}" + (f"; wrong at steps {sorted(set(bad_step))}" if bad_step else "")
                + (f"; AGVM made no update at steps {no_update}" if no_update else "")
                + ("; no update step compared" if not ref else "")))
    clamp, eps, alpha = tuple(agvm.get("clamp", (0.5, 10.0))), float(agvm.get("eps", 1e-6)), float(agvm["momentum"])
    if unit:  # μ is monotone in each cos: shift every cos by its bound to bracket it
        shift = lambda s: {t: {m: c + (-s if m == anchor else s) * bounds[t][m] for m, c in cs.items()}  # noqa: E731
                           for t, cs in ref.items()}
        lo, hi = (mu_by_step(shift(s), modules, anchor, alpha, clamp, eps) for s in (-1, 1))
    else:
        lo = hi = mu_by_step(ref, modules, anchor, alpha, clamp, eps)
    worst, bad = 0.0, []
    for t in ref:
        mu = reports[t][1]
        for m in modules:
            below, above = (lo[t][m] - mu[m]) / lo[t][m], (mu[m] - hi[t][m]) / hi[t][m]
            worst = max(worst, below, above, 0.0)
            if not max(below, above) <= COS_TOL:
                bad.append(t)
    what_mu = "worst rel distance outside the interval the bound allows" if unit else "worst rel err"
    out.append((not bad and bool(ref), worst, f"AGVM mu vs float64 brute force: {what_mu} {worst:.1e} (tol {COS_TOL:.0e})"
                + (f"; wrong at steps {sorted(set(bad))}" if bad else "")))
    return out
