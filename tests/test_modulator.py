"""The modulator's math against formulas written out independently, on fresh random data."""

import math

import pytest
import torch

from agvm_ds.core.modulator import Modulator, stats_from_halves


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
