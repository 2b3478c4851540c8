"""The precision paths the shipped configs use, on 2 gloo ranks, against brute force.

* DeepSpeed's ``torch_autocast`` (bf16) on the project's tiny RetinaNet (UniNet-tiny), ZeRO
  0, 2 and 3: AGVM's cos per module against a float64 computation from the run's own
  per-rank, per-micro-batch gradients, and stages 2/3 against stage 0.
* bf16 weights with ``data_types.grad_accum_dtype: "fp32"``: ZeRO-1 then runs DeepSpeed's
  ``BF16_Optimizer`` (its own layout, adapters.BF16OptimizerAdapter), ZeRO-2/3 accumulate
  into fp32 partitions; stage 0 is refused before start-up.

Where DeepSpeed reduces gradients in bf16 (ZeRO-2/3 under autocast: Linear/Conv weights
carry ``comm_dtype = bf16``; any bf16 model unless ``communication_data_type`` says
otherwise) the averaged gradient itself is rounded, so AGVM's statistics are compared
against the brute force within a bound derived from that rounding (``_bf16_cos_bound``);
elsewhere every reduction is fp32 and the tolerance is the fp32 tests' 1e-4.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from agvm_ds.errors import ConfigError
from agvm_ds.testing.distributed import run_distributed
from precision_cases import both_many
from reference import cos_from_run, expected_mu, halves

ANCHOR, MOMENTUM, CLAMP, EPS = "backbone", 0.5, (0.5, 10.0), 1e-6
U = 2.0 ** -9  # bf16 round-to-nearest: relative error of one rounding <= 2^-9 (8 significant bits)


def _per_rank(runs, i):
    return [per_rank[i] for per_rank in runs]


def _grads(ranks):
    return [r["grads"] for r in ranks]


def _bf16_cos_bound(grads, world, gas, estimator, owner, snapshot):
    """|Δcos| per step and module that bf16 reductions can cause, from the run's gradients.

    Reducing micro-batch k's ``world`` rank contributions in bf16 rounds each contribution
    once and each of the ``world − 1`` partial sums once, every rounding <= U of a value
    bounded by the sum of magnitudes; so the averaged micro-step gradient is off by at most
    ε_k = world·U·Σ_r‖u_rk‖ / world (2-norm, triangle inequality; ×1.01 for the
    second-order terms). AGVM's G1/G2 inherit: with a half-way ``snapshot`` (ZeRO-2/3,
    ``micro``) G1 is the snapshot and G2 = G − snapshot, so E1 = (gas/a1)·Σ_{k<a1} ε_k and
    E2 = (gas/a2)·Σ_{k>=a1} ε_k; otherwise G1, G2 = G ± c·S with S reduced by AGVM in fp32,
    so E1 = E2 = Σ_k ε_k. A vector a perturbed by δ turns by at most asin(‖δ‖/‖a‖), and
    |Δcos| <= |Δangle|, hence the bound asin(E1/‖G1‖) + asin(E2/‖G2‖) (+1e-5 for fp32 sums)."""
    steps = sorted(set.intersection(*(set(g) for g in grads)))
    h1, h2 = halves(world, gas, estimator)
    a1 = gas // 2
    modules = list(dict.fromkeys(owner.values()))
    out = {}
    for t in steps:
        out[t] = {}
        for m in modules:
            u = {(r, k): torch.cat([grads[r][t][k][n] for n in owner if owner[n] == m])
                 for r in range(world) for k in range(gas)}
            eps_k = [1.01 * world * U * sum(float(u[(r, k)].norm()) for r in range(world)) / world
                     for k in range(gas)]
            g1 = float((sum(u[key] for key in h1) * (gas / len(h1))).norm())
            g2 = float((sum(u[key] for key in h2) * (gas / len(h2))).norm())
            if snapshot and estimator == "micro":
                e1, e2 = gas / a1 * sum(eps_k[:a1]), gas / (gas - a1) * sum(eps_k[a1:])
            else:
                e1 = e2 = sum(eps_k)
            out[t][m] = math.asin(min(1.0, e1 / g1)) + math.asin(min(1.0, e2 / g2)) + 1e-5
    return out


def _mu_interval(cos_ref, bound, steps, start=1, interval=1):
    """μ is monotone in each cos (up with the module's, down with the anchor's, through the
    clamp and the smoothing), so shifting every cos by its bound brackets the μ any run with
    cos errors within the bound can reach."""
    def shifted(sign):
        return {t: {m: c + (-sign if m == ANCHOR else sign) * bound[t][m] for m, c in cs.items()}
                for t, cs in cos_ref.items()}
    lo = expected_mu(shifted(-1), steps, interval, start, MOMENTUM, CLAMP, EPS, ANCHOR)
    hi = expected_mu(shifted(+1), steps, interval, start, MOMENTUM, CLAMP, EPS, ANCHOR)
    return lo, hi


def _check_stats(ranks, world, gas, estimator, steps, bound=None, adam=None, tol=1e-4):
    """AGVM's reported cos and μ on every rank against the brute force (and, with a bound,
    within it); returns the largest |Δcos| seen and the largest bound used."""
    owner = ranks[0]["owner"]
    cos_ref = cos_from_run(_grads(ranks), world, gas, estimator, owner, adam=adam)
    assert sorted(cos_ref) == list(range(1 if adam is None else 0, steps))
    cos_upd = {t: c for t, c in cos_ref.items() if t >= 1}
    worst, widest = 0.0, 0.0
    for res in ranks:
        assert res["estimator"] == estimator
        for t, cs in cos_upd.items():
            rep = res["reports"][t]
            assert rep["step"] == t and rep["skipped"] == 0 and rep["skipped_steps"] == 0
            for m, c in cs.items():
                got = rep["modules"][m]["cos"]
                err = abs(got - c)
                worst = max(worst, err)
                if bound is None:
                    assert err <= tol * max(abs(c), 1e-3), (t, m, got, c)
                else:
                    widest = max(widest, bound[t][m])
                    assert err <= bound[t][m], (t, m, got, c, bound[t][m])
        if bound is None:
            mu_ref = expected_mu(cos_upd, steps, 1, 1, MOMENTUM, CLAMP, EPS, ANCHOR)
            for t in range(steps):
                for m, v in mu_ref[t].items():
                    assert abs(res["reports"][t]["mu"][m] - v) <= tol * v, (t, m)
        else:
            lo, hi = _mu_interval(cos_upd, bound, steps)
            for t in range(steps):
                for m in lo[t]:
                    assert lo[t][m] - 1e-6 <= res["reports"][t]["mu"][m] <= hi[t][m] + 1e-6, (t, m)
    assert any(abs(v - 1) > 1e-2 for v in ranks[0]["reports"][-1]["mu"].values()), "μ never moved: vacuous"
    return worst, widest


def _param_gap(a, b, init):
    """‖a − b‖ over ‖b − init‖: how far two runs' parameters are apart, relative to how far
    training moved them."""
    gap = math.sqrt(sum(float((a[n] - b[n]).pow(2).sum()) for n in b))
    moved = math.sqrt(sum(float((b[n] - init[n]).pow(2).sum()) for n in b))
    return gap / moved


# -- torch_autocast ---------------------------------------------------------------------------

DET_STEPS, DET_GAS = 3, 2
DET_CASES = [dict(stage=0, estimator="micro"), dict(stage=2, estimator="micro"), dict(stage=3, estimator="micro")]


@pytest.fixture(scope="module")
def all_runs():
    """Both families in one set of ranks (one process-group start-up, not two)."""
    det = [dict(case, steps=DET_STEPS, gas=DET_GAS) for case in DET_CASES]
    bf16 = [dict(case, steps=BF16_STEPS, gas=BF16_GAS) for case in BF16_CASES]
    return run_distributed(both_many, 2, det, bf16, NONFINITE_CASES)


@pytest.fixture(scope="module")
def detector_runs(all_runs):
    return [per_rank[0] for per_rank in all_runs]


def test_torch_autocast_detector_statistics_match_bruteforce(detector_runs):
    for i, case in enumerate(DET_CASES):
        ranks = _per_rank(detector_runs, i)
        res = ranks[0]
        # autocast really ran: fp32 master weights get fp32 grads; ZeRO marks Linear/Conv
        # parameters for bf16 reduction (DeepSpeed's torch_autocast.init_autocast_params)
        assert res["autocast"] and res["grad_dtypes"] == ["torch.float32"], res["grad_dtypes"]
        assert "torch.bfloat16" in res["comm_dtypes"] and "torch.float32" in res["comm_dtypes"]
        if case["stage"] == 0:
            # DeepSpeed's stage-0 all-reduce runs in communication_data_type (fp32 here): exact
            worst, _ = _check_stats(ranks, 2, DET_GAS, case["estimator"], DET_STEPS)
            print(f"autocast stage 0 {case['estimator']}: max |Δcos| {worst:.2e} (tol 1e-4 relative)")
        else:
            bound = _bf16_cos_bound(_grads(ranks), 2, DET_GAS, case["estimator"], res["owner"], snapshot=True)
            worst, widest = _check_stats(ranks, 2, DET_GAS, case["estimator"], DET_STEPS, bound=bound)
            print(f"autocast stage {case['stage']} {case['estimator']}: max |Δcos| {worst:.2e}, "
                  f"bf16 bound up to {widest:.2e}")
            assert widest < 0.05, "bound too loose to test anything"


def test_torch_autocast_detector_stages_agree(detector_runs):
    base = detector_runs[0][0]
    world = len(detector_runs)
    for i, case in enumerate(DET_CASES[1:], start=1):
        res = detector_runs[0][i]
        # identical weights and data at step 0: the same forward in every stage
        assert res["losses"][:DET_GAS] == pytest.approx(base["losses"][:DET_GAS], rel=1e-6), case
        # First step (μ = 1, SGD's first update is -lr·(G + wd·p) with the same p): the weights
        # differ by exactly lr·‖δG‖, and bf16 reduction bounds ‖δG‖ <= Σ_k ε_k (see
        # _bf16_cos_bound) from the gradient norms of step 0 on every rank.
        eps_k = [1.01 * world * U * sum(r["norms"][0][k] for r in _per_rank(detector_runs, i)) / world
                 for k in range(DET_GAS)]
        first_bound = res["lr"] * sum(eps_k) * (1 + 1e-3)
        first_gap = math.sqrt(sum(float((res["after_first"][n] - base["after_first"][n]).pow(2).sum())
                                  for n in base["params"]))
        assert first_gap <= first_bound, (case, first_gap, first_bound)
        assert first_gap > 0, "stage 2/3 reduced in fp32: the bf16 bound is not exercised"
        # Later steps: the autocast forward rounds the (now slightly different) fp32 weights to
        # bf16 again, so the runs' gradients differ by bf16 noise however close the weights are
        # (measured: the gap grows ~20x in two steps under autocast, ~3x in fp32); what must
        # hold is that the fp32 weights stay within one bf16 rounding of each other (2^-9
        # relative, the resolution at which the autocast forward sees them), that each loss,
        # itself a bf16 forward, agrees to 2^-7, and μ — a function of cos, whose bf16 error
        # bound above is < 0.05 and measured ~1e-4 — to 2e-2.
        gap = math.sqrt(sum(float((res["params"][n] - p).pow(2).sum()) for n, p in base["params"].items())
                        / sum(float(p.pow(2).sum()) for p in base["params"].values()))
        loss_gap = max(abs(a - b) / b for a, b in zip(res["losses"], base["losses"]))
        mu_gap = max(abs(res["reports"][-1]["mu"][m] - v) for m, v in base["reports"][-1]["mu"].items())
        print(f"autocast stage {case['stage']} {case['estimator']} vs stage 0: first step {first_gap:.2e} "
              f"(bound {first_bound:.2e}); after {DET_STEPS} steps params {gap:.2e} relative, "
              f"losses {loss_gap:.2e} relative, μ {mu_gap:.2e}")
        assert gap <= U, (case, gap)
        assert loss_gap <= 2.0 ** -7, (case, loss_gap)
        if case["estimator"] == "micro":
            assert mu_gap <= 2e-2, (case, mu_gap)
    assert any(abs(v - 1) > 1e-2 for v in base["reports"][-1]["mu"].values()), "μ never moved: vacuous"


# -- bf16 weights, fp32 gradient accumulation -------------------------------------------------

BF16_STEPS, BF16_GAS = 3, 2
BF16_CASES = [
    dict(stage=1, estimator="micro"),                                  # 0: BF16_Optimizer
    dict(stage=1, estimator="ranks"),                                  # 1
    dict(stage=1, estimator="micro", opt="adamw"),                     # 2: preconditioned
    dict(stage=1, estimator="micro", extra={"bf16": {"enabled": True, "immediate_grad_update": True}}),  # 3
    dict(stage=1, estimator="ranks", comm=None),                       # 4: DeepSpeed's bf16 all-reduce
    dict(stage=2, estimator="micro"),                                  # 5: fp32 flat partitions
    dict(stage=3, estimator="micro"),                                  # 6
    dict(stage=0, estimator="micro", accum=None),                      # 7: stage 0, bf16 accumulation
]


@pytest.fixture(scope="module")
def bf16_runs(all_runs):
    return [per_rank[1] for per_rank in all_runs]


def test_bf16_fp32_accumulation_statistics_match_bruteforce(bf16_runs):
    for i, case in enumerate(BF16_CASES[:7]):
        ranks = _per_rank(bf16_runs, i)
        res = ranks[0]
        expected = ("BF16_Optimizer", "BF16OptimizerAdapter") if case["stage"] == 1 else \
            ("DeepSpeedZeroOptimizer", "Stage12CompactAdapter") if case["stage"] == 2 else \
            ("DeepSpeedZeroOptimizer_Stage3", "Stage3Adapter")
        assert (res["optimizer"], res["adapter"]) == expected, (case, res["optimizer"], res["adapter"])
        assert res["grad_dtypes"] == ["torch.bfloat16"]
        adam = (0.99, 1e-8) if case.get("opt") == "adamw" else None
        if case.get("comm", "fp32") is None:
            bound = _bf16_cos_bound(_grads(ranks), 2, BF16_GAS, case["estimator"], res["owner"], snapshot=False)
            worst, widest = _check_stats(ranks, 2, BF16_GAS, case["estimator"], BF16_STEPS, bound=bound)
            assert widest < 0.05, "bound too loose to test anything"
            print(f"bf16 {case}: max |Δcos| {worst:.2e}, bf16 bound up to {widest:.2e}")
        else:
            # fp32 accumulation of bf16 micro-grads and fp32 reductions: only fp32 rounding left
            worst, _ = _check_stats(ranks, 2, BF16_GAS, case["estimator"], BF16_STEPS, adam=adam)
            print(f"bf16 {case}: max |Δcos| {worst:.2e} (tol 1e-4 relative)")


def test_bf16_fp32_accumulation_stages_agree(bf16_runs):
    first = bf16_runs[0]
    for i in range(len(BF16_CASES)):  # the same bf16 weights and data at step 0 everywhere
        assert first[i]["losses"][:BF16_GAS] == first[0]["losses"][:BF16_GAS], BF16_CASES[i]
    # ZeRO-1 (BF16_Optimizer), ZeRO-2 and ZeRO-3 with fp32 accumulation and fp32 reductions
    # differ only in fp32 summation order (~1e-7 of a gradient): μ, losses and fp32 master
    # weights agree to 1e-5 (a bf16 weight rounding could flip only within 1e-7 of a tie).
    for i in (5, 6):
        a, b = first[i], first[0]
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5), BF16_CASES[i]
        assert a["reports"][-1]["mu"] == pytest.approx(b["reports"][-1]["mu"], rel=1e-5), BF16_CASES[i]
        for n, p in b["params"].items():
            assert float((a["params"][n] - p).norm()) <= 1e-5 * float(p.norm()), (BF16_CASES[i], n)
    # Stage 0 (DeepSpeed's only bf16 path there, FP16_UnfusedOptimizer in bf16 mode, keeps
    # p.grad in bf16: the micro-step sum and the reduced value are each rounded once more,
    # <= 2·2^-9 ≈ 4e-3 of each step's gradient) tracks ZeRO-1: fp32 master weights within
    # 2e-2 of the distance trained (5x that), μ within 1e-2 (cos moves by at most the bf16
    # bound's order, 1e-2, and μ by (1 − α) = 0.5 of the ratio it feeds).
    s0, s1 = first[7], first[0]
    mu_gap = max(abs(s0["reports"][-1]["mu"][m] - v) for m, v in s1["reports"][-1]["mu"].items())
    gap = _param_gap(s0["params"], s1["params"], s1["init"])
    print(f"bf16 stage 0 vs ZeRO-1 BF16_Optimizer: params {gap:.2e} of the movement, μ {mu_gap:.2e}")
    assert gap <= 2e-2
    assert mu_gap <= 1e-2


FP32_ACCUM = {"data_types": {"grad_accum_dtype": "fp32"}}
# agvm_cases.train: AGVM updates on steps 1 and 3; NaN on update step 3, inf on plain step 2,
# each on one rank only (as test_agvm_robustness does for the other optimizers)
NONFINITE_CASES = [dict(stage=1, gas=2, opt="sgd", steps=5, precision="bf16", extra=FP32_ACCUM, inject=inj)
                   for inj in ((3, 1, float("nan")), (2, 0, float("inf")))]


@pytest.fixture(scope="module")
def nonfinite_runs(all_runs):
    return [per_rank[2] for per_rank in all_runs]


def test_bf16_optimizer_skips_nonfinite_steps_and_keeps_mu(nonfinite_runs):
    for i, case in enumerate(NONFINITE_CASES):
        s_inj = case["inject"][0]
        for res in _per_rank(nonfinite_runs, i):
            by_step = res["params_by_step"]
            assert all(torch.isfinite(p).all() for params in by_step for p in params.values()), case
            before, after, nxt = by_step[s_inj - 1], by_step[s_inj], by_step[s_inj + 1]
            assert all(torch.equal(before[n], after[n]) for n in before), ("step not skipped", case)
            assert any(not torch.equal(after[n], nxt[n]) for n in after), ("training stopped", case)
            assert all(math.isfinite(v) for rep in res["reports"] for v in rep["mu"].values())
            assert res["reports"][-1]["skipped_steps"] == 1
            # a NaN on an update step leaves μ as it was (the update is counted as skipped)
            assert res["reports"][-1]["skipped"] == (1 if s_inj == 3 else 0)
            if s_inj == 3:
                assert res["reports"][3]["mu"] == res["reports"][2]["mu"]


def test_bf16_fp32_accumulation_without_zero_is_refused_before_startup():
    import agvm_ds
    from agvm_cases import MODULES, build_model, ds_config
    from agvm_ds.config.run import validate_run_dict

    cfg = ds_config(0, 2, "sgd", "bf16", world=1, extra={"data_types": {"grad_accum_dtype": "fp32"}})
    # no process group exists here: the refusal must come before DeepSpeed starts
    with pytest.raises(ConfigError, match=r"^data_types\.grad_accum_dtype: .*only under ZeRO — set zero_optimization\.stage"):
        agvm_ds.initialize(model=build_model(), config=cfg, modules=MODULES)
    run = {**cfg, "model": {"spec": "models/retinanet_uninet_tiny.json", "num_classes": 6}, "train": {"max_steps": 1},
           "gradient_clipping": 0.0}
    run.pop("agvm")
    with pytest.raises(ConfigError, match=r"^data_types\.grad_accum_dtype"):
        validate_run_dict(run, Path("x.json"), world_size=1)
    ok = {**run, "zero_optimization": {**run["zero_optimization"], "stage": 1}}
    validate_run_dict(ok, Path("x.json"), world_size=1)  # ZeRO-1: BF16_Optimizer
