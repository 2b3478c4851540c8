"""The modulator's math (μ, and the gradient-noise scale down to metrics, monitors, the
end-of-run line and the plot) against formulas written out independently, on fresh random data."""

import json
import math

import pytest
import torch

from agvm_ds.core.modulator import Modulator, noise_terms, stats_from_halves


def _naive(g1s, g2s, anchor, clamp, eps):
    cos = {m: sum(a * b for a, b in zip(g1s[m], g2s[m])) /
           math.sqrt(sum(a * a for a in g1s[m]) * sum(b * b for b in g2s[m])) for m in g1s}
    out = {}
    for m in g1s:
        ratio = (1 - cos[anchor] + eps) / (1 - cos[m] + eps)
        out[m] = 1.0 if m == anchor else math.sqrt(min(max(ratio, clamp[0]), clamp[1]))
    return cos, out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_matches_naive_formula(seed):
    g = torch.Generator().manual_seed(seed)
    mods = ["backbone", "neck", "head"]
    m = Modulator(mods, "backbone", interval=3, momentum=0.8, start_step=2, clamp=(0.5, 10.0), eps=1e-6)
    mu = {k: 1.0 for k in mods}
    for step in range(12):
        g1 = {k: torch.randn(50, generator=g, dtype=torch.float64).tolist() for k in mods}
        noise = {"backbone": 0.3, "neck": 2.0, "head": 0.05}
        g2 = {k: [a + noise[k] * float(torch.randn(1, generator=g)) for a in g1[k]] for k in mods}
        if m.is_update_step(step):
            sums = torch.stack([stats_from_halves(torch.tensor(g1[k], dtype=torch.float64), torch.tensor(g2[k], dtype=torch.float64)) for k in mods])
            assert m.update(step, sums)
            cos, raw = _naive(g1, g2, "backbone", (0.5, 10.0), 1e-6)
            for k in mods:
                mu[k] = 0.8 * mu[k] + 0.2 * raw[k]
                assert m.last[k].cos == pytest.approx(cos[k], rel=1e-12)
        assert m.is_update_step(step) == (step >= 2 and (step - 2) % 3 == 0)
        for k in mods:
            assert m.multiplier(k, step) == pytest.approx(mu[k] if step >= 2 else 1.0, rel=1e-12)
    assert m.updates == 4
    assert m.multiplier("neck", 11) < 1 < m.multiplier("head", 11)  # noisy neck slowed, clean head sped up


def test_clamp_bounds_and_anchor_fixed():
    m = Modulator(["a", "b", "c"], "a", momentum=0.0, clamp=(0.5, 10.0))
    # a: phi=0.5; b: phi≈0 (ratio huge -> hi); c: phi=2 (ratio .25 -> lo)
    sums = torch.tensor([[0.5, 1, 1], [1.0, 1, 1], [-1.0, 1, 1]], dtype=torch.float64)
    assert m.update(0, sums)
    assert m.mu.tolist() == pytest.approx([1.0, math.sqrt(10.0), math.sqrt(0.5)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_statistics_never_reach_mu(bad):
    m = Modulator(["a", "b"], "a", momentum=0.5)
    assert m.update(0, torch.tensor([[0.5, 1, 1], [0.1, 1, 1]], dtype=torch.float64))
    before = m.mu.clone()
    assert not m.update(1, torch.tensor([[0.5, 1, 1], [bad, 1, 1]], dtype=torch.float64))
    assert torch.equal(m.mu, before) and m.skipped == 1 and m.updates == 1


def test_module_without_gradient_keeps_its_mu():
    m = Modulator(["a", "b", "c"], "a", momentum=0.5)
    m.update(0, torch.tensor([[0.5, 1, 1], [0.1, 1, 1], [0.9, 1, 1]], dtype=torch.float64))
    mu_c = float(m.mu[2])
    assert m.update(1, torch.tensor([[0.5, 1, 1], [0.1, 1, 1], [0.0, 0, 0]], dtype=torch.float64))
    assert float(m.mu[2]) == mu_c and torch.isfinite(m.mu).all()
    assert not m.update(2, torch.tensor([[0.0, 0, 0], [0.1, 1, 1], [0.9, 1, 1]], dtype=torch.float64))


def test_state_dict_round_trip():
    m = Modulator(["a", "b"], "a")
    m.update(0, torch.tensor([[0.5, 1, 1], [0.1, 1, 2]], dtype=torch.float64))
    m2 = Modulator(["a", "b"], "a")
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m.mu, m2.mu) and m2.updates == 1 and m2.report() == m.report()
    with pytest.raises(ValueError, match="modules"):
        Modulator(["a", "c"], "a").load_state_dict(m.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    (dict(interval=0), "interval"), (dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"),
    (dict(clamp=(2.0, 1.0)), "clamp"), (dict(start_step=-1), "start_step"), (dict(eps=-1.0), "eps")])
def test_bad_hyper_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Modulator(["a", "b"], "a", **kwargs)
    with pytest.raises(ValueError, match="anchor"):
        Modulator(["a", "b"], "z")


# -- the gradient-noise scale (McCandlish et al. 2018) from the same sums ----------------------
def _per_sample(g, n, dims, noise):
    """n per-sample gradients per module: a fixed mean plus Gaussian noise of the given scale."""
    return {k: torch.randn(dims, generator=g, dtype=torch.float64) + noise[k] * torch.randn(n, dims, generator=g,
                                                                                           dtype=torch.float64)
            for k in noise}


def _bruteforce_terms(x1, x2):
    """(tr Σ, |G|²) from per-sample gradient lists of the two halves, in plain float64 Python."""
    b1, b2 = len(x1), len(x2)
    g1 = [sum(col) / b1 for col in zip(*x1)]
    g2 = [sum(col) / b2 for col in zip(*x2)]
    cross = sum(a * b for a, b in zip(g1, g2))
    return (b1 * (sum(a * a for a in g1) - cross) + b2 * (sum(b * b for b in g2) - cross)) / 2, cross


@pytest.mark.parametrize("seed,b1,b2", [(0, 3, 7), (1, 6, 6), (2, 9, 4)])
def test_noise_scale_matches_bruteforce_on_per_sample_gradients(seed, b1, b2):
    g = torch.Generator().manual_seed(seed)
    mods, alpha = ["backbone", "neck", "head"], 0.7
    noise = {"backbone": 0.5, "neck": 2.0, "head": 0.1}
    m = Modulator(mods, "backbone", interval=1, momentum=alpha)
    m.set_half_samples(b1, b2)
    history = []  # per update: {module or "model": (tr Σ, |G|²)}
    for step in range(6):
        xs = _per_sample(g, b1 + b2, 40, noise)
        halves = {k: (xs[k][:b1], xs[k][b1:]) for k in mods}
        g1 = {k: h[0].mean(0) for k, h in halves.items()}
        g2 = {k: h[1].mean(0) for k, h in halves.items()}
        assert m.update(step, torch.stack([stats_from_halves(g1[k], g2[k]) for k in mods]))
        terms = {k: _bruteforce_terms(halves[k][0].tolist(), halves[k][1].tolist()) for k in mods}
        terms["model"] = _bruteforce_terms(torch.cat([halves[k][0] for k in mods], 1).tolist(),
                                           torch.cat([halves[k][1] for k in mods], 1).tolist())
        history.append(terms)
        weights = [(1 - alpha) * alpha ** (len(history) - 1 - i) for i in range(len(history))]
        rep = m.report()
        for k in [*mods, "model"]:
            num = sum(w * h[k][0] for w, h in zip(weights, history))
            den = sum(w * h[k][1] for w, h in zip(weights, history))
            got = rep["b_noise"] if k == "model" else rep["modules"][k]["b_noise"]
            if num > 0 and den > 0:
                assert got == pytest.approx(num / den, rel=1e-9), (step, k)
            else:
                assert got is None, (step, k, got)
    b = m.report()["modules"]
    assert b["head"]["b_noise"] < b["backbone"]["b_noise"] < b["neck"]["b_noise"]  # ordered like the noise


def test_noise_terms_are_unbiased_only_with_the_right_half_sizes():
    """Over many independent draws the estimates average to the true tr Σ and |G|² of the
    sampling distribution; the same draws with b1, b2 swapped do not (the test can fail)."""
    g = torch.Generator().manual_seed(7)
    trials, dims, b1, b2 = 4000, 12, 3, 13
    mean = torch.randn(dims, generator=g, dtype=torch.float64)
    sigma = torch.rand(dims, generator=g, dtype=torch.float64) * 2
    x = mean + sigma * torch.randn(trials, b1 + b2, dims, generator=g, dtype=torch.float64)
    g1, g2 = x[:, :b1].mean(1), x[:, b1:].mean(1)
    sums = torch.stack([(g1 * g2).sum(1), (g1 * g1).sum(1), (g2 * g2).sum(1)], dim=1)  # one "module" per draw

    def mean_and_error(terms, col):
        v = terms[:-1, col]  # the last row is the sum over draws
        return float(v.mean()), float(v.std() / math.sqrt(trials))

    right = noise_terms(sums, (b1, b2))
    for col, truth in ((0, float((sigma ** 2).sum())), (1, float(mean @ mean))):
        est, se = mean_and_error(right, col)
        assert abs(est - truth) < 4 * se, (col, est, truth, se)
    est, se = mean_and_error(noise_terms(sums, (b2, b1)), 0)
    assert abs(est - float((sigma ** 2).sum())) > 20 * se
    assert torch.allclose(right[-1], right[:-1].sum(0))


def _micro_halves(accumulation, world):
    a1 = accumulation // 2
    return ([(r, k) for r in range(world) for k in range(a1)],
            [(r, k) for r in range(world) for k in range(a1, accumulation)])


def _ranks_halves(accumulation, world):
    n1 = world // 2
    return ([(r, k) for r in range(n1) for k in range(accumulation)],
            [(r, k) for r in range(n1, world) for k in range(accumulation)])


@pytest.mark.parametrize("accumulation,world", [(2, 1), (3, 2), (5, 3), (1, 4), (4, 7)])
def test_estimators_state_their_half_sample_counts(accumulation, world):
    from agvm_ds.core.estimators import MicroEstimator, RanksEstimator

    for cls, halves, ok in ((MicroEstimator, _micro_halves, accumulation >= 2),
                            (RanksEstimator, _ranks_halves, world >= 2)):
        if not ok:
            continue
        for micro_batch in (1, 4):
            h1, h2 = halves(accumulation, world)  # the (rank, micro-batch) pairs of each half
            assert cls(accumulation, world, 0).half_samples(micro_batch) == (len(h1) * micro_batch,
                                                                             len(h2) * micro_batch)


def test_noise_scale_state_skips_and_undefined_values():
    m = Modulator(["a", "b"], "a", momentum=0.5)
    sums = torch.tensor([[0.5, 1, 1.2], [-0.1, 1, 1]], dtype=torch.float64)  # b: ⟨G1,G2⟩ < 0
    assert m.update(0, sums)
    assert m.report()["modules"]["a"]["b_noise"] is None and m.report()["b_noise"] is None  # b unknown
    m.set_half_samples(2, 4)
    assert m.update(1, sums)
    rep = m.report()
    assert rep["modules"]["a"]["b_noise"] == pytest.approx((2 * 0.5 + 4 * 0.7) / 2 / 0.5)
    assert rep["modules"]["b"]["b_noise"] is None  # smoothed |G|² ≤ 0: undefined, not negative
    assert rep["b_noise"] == pytest.approx((2 * (2 - 0.4) + 4 * (2.2 - 0.4)) / 2 / 0.4)  # the summed rows
    before = m.noise.clone()
    assert not m.update(2, torch.tensor([[0.5, 1, 1], [float("nan"), 1, 1]], dtype=torch.float64))
    assert torch.equal(m.noise, before)
    # raw sums for the noise scale beside preconditioned ones for Φ
    raw = torch.tensor([[1.0, 2, 2], [1.0, 3, 3]], dtype=torch.float64)
    assert m.update(3, sums, raw)
    assert torch.allclose(m.noise, 0.5 * before + 0.5 * noise_terms(raw, (2, 4)))
    # checkpoint round trip, and a state from before the noise scale (no "noise" key) still loads
    m2 = Modulator(["a", "b"], "a", momentum=0.5)
    m2.load_state_dict(m.state_dict())
    assert m2.report() == m.report()
    old = {k: v for k, v in m.state_dict().items() if k != "noise"}
    m3 = Modulator(["a", "b"], "a", momentum=0.5)
    m3.load_state_dict(old)
    m3.set_half_samples(2, 4)
    assert m3.report()["b_noise"] is None and torch.equal(m3.mu, m.mu)
    assert m3.update(4, raw) and m3.report()["modules"]["a"]["b_noise"] == pytest.approx((2 + 4) / 2)
    with pytest.raises(ValueError, match="half sample"):
        m3.set_half_samples(0, 4)


def _png_width(path) -> int:
    import struct

    return struct.unpack(">I", path.read_bytes()[16:20])[0]  # the IHDR chunk's width


def test_noise_scale_reaches_metrics_monitor_summary_and_plot(tmp_path):
    from agvm_ds.train.metrics import MetricsWriter, agvm_model_fields, agvm_record, noise_scale_line, read_metrics
    from agvm_ds.train.plot import plot_modulation

    class Monitor:
        enabled = True

        def __init__(self):
            self.events = []

        def write_events(self, events):
            self.events += events

    mods = ["backbone", "neck"]
    m = Modulator(mods, "backbone", interval=1, momentum=0.5)
    m.set_half_samples(8, 8)
    path, monitor = tmp_path / "metrics.jsonl", Monitor()
    w = MetricsWriter(path, start_step=0, monitor=monitor)
    for step in range(4):
        neck = -0.2 if step == 0 else 0.6  # the neck's |G|² starts negative: undefined, then defined
        assert m.update(step, torch.tensor([[0.5, 1.0, 1.1], [neck, 1.0, 1.0]], dtype=torch.float64))
        rep = m.report()
        rep["mu"] = dict(zip(mods, m.mu.tolist()))
        agvm, _ = agvm_record(rep, None)
        w.write({"step": step + 1, "loss": 1.0, "agvm": agvm, **agvm_model_fields(rep)})
    w.close()
    rows = read_metrics(path)
    assert rows[0]["agvm"]["neck"]["b_noise"] is None
    assert rows[-1]["agvm"]["neck"]["b_noise"] == rep["modules"]["neck"]["b_noise"]
    assert rows[-1]["agvm_b_noise"] == rep["b_noise"] and rep["b_noise"] > 0
    names = {(n, s) for n, _, s in monitor.events}
    assert ("AGVM/b_noise/neck", 4) in names and ("AGVM/b_noise/neck", 1) not in names  # None is no event
    assert ("Train/agvm_b_noise", 4) in names
    line = noise_scale_line(rep, 512)
    b = {k: s["b_noise"] for k, s in rep["modules"].items()}
    assert line.startswith(f"gradient-noise scale B_noise (last smoothed): model ≈ {rep['b_noise']:.3g} samples, "
                           f"per module backbone {b['backbone']:.3g}, neck {b['neck']:.3g}; this run's global batch: "
                           f"512 ({512 / rep['b_noise']:.2g} × B_noise). B_noise is the batch at which gradient "
                           f"noise and signal are about equal: far below it"), line
    assert "far above it a larger batch buys little per step" in line and "\n" not in line
    assert ("model undefined, per module neck undefined;" in
            noise_scale_line(Modulator(mods, "backbone").report() | {"modules": {"neck": {}}}, 1))
    assert noise_scale_line({"step": -1, "modules": {}, "b_noise": None}, 16) is None
    with_noise = plot_modulation(path, tmp_path / "b.png", global_batch=512)
    for r in rows:  # the same records as written before B_noise existed: two panels
        r.pop("agvm_b_noise")
        for s in r["agvm"].values():
            s.pop("b_noise")
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps(r) + "\n" for r in rows))
    without = plot_modulation(old, tmp_path / "a.png")
    assert _png_width(with_noise) > 1.4 * _png_width(without)
