"""AGVM's statistics recomputed by brute force in float64, from the definitions only.

Used by :mod:`agvm_ds.selfcheck` (it ships to users) and by the conformance bench. Nothing
here reads :mod:`agvm_ds.core`: the halves, the preconditioning and μ are written again
from the paper's and the docs' definitions (docs/agvm.md), so a slip in the package's own
statistics code cannot hide in both.

Notation. ``u[(r, k)]`` is rank r's own gradient of micro-batch k of one step (what autograd
delivered inside ``engine.backward``, i.e. of ``loss / gas``, loss scale removed), a dict
parameter name → flat float64 tensor. DeepSpeed steps with G = Σ_{r,k} u[(r, k)] / world.
G1 / G2 are the means over each half at that same scale.

Two references, two checks (:func:`compare`):

* AGVM's cos and μ are a function of DeepSpeed's averaged gradient ``G`` and one more vector
  ``S`` per step (``micro``: the averaged running sum after ⌊A/2⌋ micro-batches; ``ranks``:
  the first half-ranks' mean of their own step gradient minus the other half's). The
  self-check reads both *as DeepSpeed holds them* (:mod:`agvm_ds.held`), so the float64
  cos computed here from them differs from AGVM's only by AGVM's own fp32 arithmetic, in
  every precision: the tolerance is :data:`COS_TOL`, not a bound on bf16 rounding.
* Those held tensors against the same sums formed in float64 from the hook-recorded ``u``
  (a plain all-reduce): equal up to DeepSpeed's rounding, bounded by
  :func:`rounding_bound`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

#: AGVM vs the float64 cos/μ of the tensors DeepSpeed holds (relative, cos below 1e-3 in
#: absolute terms): what fp32 products and float64 sums leave, in every precision
COS_TOL = 1e-5
#: DeepSpeed's held gradients vs a float64 all-reduce where every sum is fp32 (relative)
GRAD_TOL = 1e-5


def precondition(g: torch.Tensor, v: torch.Tensor, beta2: float, eps: float) -> torch.Tensor:
    """ĝ = g / (sqrt(β2·v + (1 − β2)·g²) + eps), v the optimizer's second moment before the step."""
    return g / (torch.sqrt(beta2 * v + (1 - beta2) * g * g) + eps)


class Split(NamedTuple):
    """One way of halving a step, written from its definition (docs/agvm.md)."""

    name: str
    #: S as a combination of the recorded gradients: (world, gas) → {(rank, micro): weight}
    second: Callable[[int, int], dict]
    #: (G, S, world, gas) → (G1, G2)
    halves: Callable[[dict, dict, int, int], tuple[dict, dict]]
    #: what S is, as DeepSpeed holds it (for the check's line)
    held: str


def _micro_second(world: int, gas: int) -> dict:
    """The averaged running sum after a1 = ⌊gas/2⌋ micro-batches: Σ_{r, k<a1} u/world."""
    return {(r, k): (1.0 / world if k < gas // 2 else 0.0) for r in range(world) for k in range(gas)}


def _micro_halves(G: dict, S: dict, world: int, gas: int) -> tuple[dict, dict]:
    """G1 = (A/a1)·S, G2 = A/(A − a1)·(G − S): the first a1 micro-batches vs the rest."""
    a1 = gas // 2
    return {n: S[n] * (gas / a1) for n in G}, {n: (G[n] - S[n]) * (gas / (gas - a1)) for n in G}


def _ranks_second(world: int, gas: int) -> dict:
    """The mean over ranks [0, n1) of their own step gradient Σ_k u minus the mean over the
    rest, n1 = ⌊world/2⌋."""
    n1 = world // 2
    return {(r, k): (1.0 / n1 if r < n1 else -1.0 / (world - n1)) for r in range(world) for k in range(gas)}


def _ranks_halves(G: dict, S: dict, world: int, gas: int) -> tuple[dict, dict]:
    """G1 = G + (n2/N)·S, G2 = G − (n1/N)·S (so that G = (n1·G1 + n2·G2)/N)."""
    n1 = world // 2
    return {n: G[n] + S[n] * ((world - n1) / world) for n in G}, {n: G[n] - S[n] * (n1 / world) for n in G}


MICRO = Split("micro", _micro_second, _micro_halves, "running sum after the first half")
RANKS = Split("ranks", _ranks_second, _ranks_halves, "rank halves before reduction")
#: ``agvm.estimator`` → the split it runs with two or more micro-batches per step (``auto``:
#: micro); with one, every split is by ranks
SPLITS = {"micro": MICRO, "ranks": RANKS, "auto": MICRO}


def split_of(estimator: str, gas: int) -> Split:
    """The split a run with ``gas`` micro-batches per step measures with."""
    return SPLITS[estimator] if gas >= 2 else RANKS


def module_cos(G1: dict, G2: dict, owner: dict) -> dict:
    """cos(G1, G2) per module over all its elements (``owner``: parameter name → module)."""
    out = {}
    for m in dict.fromkeys(owner.values()):
        a = torch.cat([G1[n].reshape(-1) for n in owner if owner[n] == m])
        b = torch.cat([G2[n].reshape(-1) for n in owner if owner[n] == m])
        out[m] = float(a @ b / (a.norm() * b.norm()))
    return out


def cos_by_step(G: dict, S: dict, world: int, gas: int, split: Split, owner: dict, adam=None, skipped=()) -> dict:
    """cos per module of every step of ``G`` (``G[t]``, ``S[t]``: name → float64 tensor, as
    DeepSpeed held them, scale removed). ``adam = (β2, eps)`` preconditions the halves with
    the second moment the optimizer holds before step t, rebuilt in float64 from DeepSpeed's
    averaged gradients of the earlier steps; steps in ``skipped`` neither update it nor get a cos."""
    names = list(owner)
    v = {n: 0.0 for n in names}
    out = {}
    for t in sorted(G):
        if t in skipped:
            continue
        G1, G2 = split.halves(G[t], S[t], world, gas)
        if adam is not None:
            beta2, eps = adam
            G1 = {n: precondition(G1[n], v[n], beta2, eps) for n in names}
            G2 = {n: precondition(G2[n], v[n], beta2, eps) for n in names}
            v = {n: beta2 * v[n] + (1 - beta2) * G[t][n] ** 2 for n in names}
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


def rounding_bound(u: dict, coeff: dict, names: list, world: int, gas: int, unit: float) -> float:
    """Relative distance DeepSpeed's rounding allows between a held sum Σ c·u and the same
    sum in float64 (``unit``: the unit roundoff of the narrowest dtype gradients are summed
    or reduced in; 0 where all are fp32). Each sum DeepSpeed forms of these terms (the
    accumulation over gas micro-batches, the reduction over world ranks) rounds every
    partial sum once, each rounding ≤ unit × the sum of magnitudes: ≤ 1.01·(world + gas)·
    unit·Σ|c|·‖u‖ (triangle inequality), over the norm of the exact sum; plus GRAD_TOL."""
    exact = sum(c * torch.cat([u[key][n] for n in names]) for key, c in coeff.items() if c)
    if not unit:
        return GRAD_TOL
    mags = sum(abs(c) * float(torch.cat([u[key][n] for n in names]).norm()) for key, c in coeff.items())
    return 1.01 * (world + gas) * unit * mags / max(float(exact.norm()), 1e-300) + GRAD_TOL


def _held_vs_plain(allsteps, held: dict, coeff: dict, skipped, world, gas, owner, unit):
    """Worst relative distance of ``held[t]`` (by name) from Σ coeff·u, its bound, the modules
    with no gradient readable."""
    worst, bound, missing = 0.0, GRAD_TOL, []
    for t in sorted(held):
        if t in skipped:
            continue
        u = allsteps[t]
        for m in dict.fromkeys(owner.values()):
            ns = [n for n in owner if owner[n] == m]
            if any(held[t][n] is None for n in ns):
                missing.append(m)
                continue
            a = torch.cat([held[t][n] for n in ns])
            b = sum(c * torch.cat([u[key][n] for n in ns]) for key, c in coeff.items() if c)
            worst = max(worst, float((a.to(b.device) - b).norm() / b.norm()))
            bound = max(bound, rounding_bound(u, coeff, ns, world, gas, unit))
    return worst, bound, missing


def compare(allsteps, G, S, reports, skipped, world, gas, estimator, owner, anchor, agvm, adam,
            unit, steps) -> list[tuple[bool, float, str]]:
    """The self-check's verdicts as (ok, worst error, line).

    ``reports[t] = (cos by module, μ by module, AGVM's last update step, its count of skipped
    updates)`` after step t.

    (b) ``G[t]`` (DeepSpeed's averaged gradient at the boundary) and ``S[t]`` (the second
    vector AGVM reads, as DeepSpeed held it: :mod:`agvm_ds.held`) against the same sums of
    the hook-recorded ``allsteps`` in float64, within DeepSpeed's rounding
    (:func:`rounding_bound`); (a) AGVM's cos, μ and skip count against :func:`cos_by_step` / :func:`mu_by_step` of ``G``, ``S`` at :data:`COS_TOL`.
    ``skipped``: steps DeepSpeed skipped or with a non-finite recorded gradient — no update,
    μ unchanged."""
    out = []
    split = split_of(estimator, gas)
    mean = {(r, k): 1.0 / world for r in range(world) for k in range(gas)}
    wg, bg, miss_g = _held_vs_plain(allsteps, G, mean, skipped, world, gas, owner, unit)
    ws, bs, miss_s = _held_vs_plain(allsteps, S, split.second(world, gas), skipped, world, gas, owner, unit)
    missing = sorted(set(miss_g + miss_s))
    ok = not missing and wg <= bg and ws <= bs and math.isfinite(wg + ws)
    out.append((ok, max(wg, ws), f"DeepSpeed averaged gradients vs plain all_reduce: worst rel err {wg:.1e} (tol {bg:.1e}); "
                f"its {split.held}: {ws:.1e} (tol {bs:.1e})"
                + (f"; no gradient readable for {missing}" if missing else "")))
    # (a) AGVM's cos and μ against the float64 cos of the tensors DeepSpeed held
    upd = {t for t in range(1, steps) if t not in skipped}
    ref = cos_by_step(G, S, world, gas, split, owner, adam=adam, skipped=skipped)
    ref = {t: c for t, c in ref.items() if t in upd}
    worst, bad_step, no_update = 0.0, [], []
    for t, cs in ref.items():
        got, _, step, _ = reports[t]
        for m, c in cs.items():
            err = abs(got.get(m, math.nan) - c) / max(abs(c), 1e-3)
            worst = max(worst, err) if math.isfinite(err) else math.inf
            if step != t or not err <= COS_TOL:
                bad_step.append(t)
        if step != t:
            no_update.append(t)
    what = "preconditioned " if adam else ""
    named = f"{estimator}, split by ranks at GAS 1" if SPLITS[estimator] is not RANKS and gas < 2 else estimator
    out.append((not bad_step and bool(ref), worst, f"AGVM {what}cos vs float64 of DeepSpeed's held gradients ({named}, "
                f"{len(ref)} updates): worst rel err {worst:.1e} (tol {COS_TOL:.0e})"
                + (f"; wrong at steps {sorted(set(bad_step))}" if bad_step else "")
                + (f"; AGVM made no update at steps {no_update}" if no_update else "")
                + ("; no update step compared" if not ref else "")))
    clamp, eps, alpha = tuple(agvm.get("clamp", (0.5, 10.0))), float(agvm.get("eps", 1e-6)), float(agvm["momentum"])
    modules = list(dict.fromkeys(owner.values()))
    ref_mu = mu_by_step(ref, modules, anchor, alpha, clamp, eps)
    worst, bad, expect = 0.0, [], {m: 1.0 for m in modules}
    for t in range(1, steps):  # skipped steps too: μ must stay where it was
        expect = ref_mu.get(t, expect)
        mu = reports[t][1]
        for m in modules:
            err = abs(mu.get(m, math.nan) - expect[m]) / expect[m]
            worst = max(worst, err) if math.isfinite(err) else math.inf
            if not err <= COS_TOL:
                bad.append(t)
    kept = sorted(set(range(1, steps)) & set(skipped))
    counted = reports[steps - 1][3]
    out.append((not bad and bool(ref) and counted == len(kept), worst,
                f"AGVM mu vs float64 brute force: worst rel err {worst:.1e} (tol {COS_TOL:.0e})"
                + (f"; unchanged over skipped steps {kept}" if kept else "")
                + (f"; wrong at steps {sorted(set(bad))}" if bad else "")
                + (f"; AGVM counted {counted} skipped updates, expected {len(kept)}" if counted != len(kept) else "")))
    return out
