"""agvm_ds.core.statistics against G1/G2 formed explicitly in float64 on fresh random data.

Every numeric test runs twice: through the fused C kernel (agvm_ds.core.native) and through
the torch fallback."""

from __future__ import annotations

import pytest
import torch

from agvm_ds.core import native
from agvm_ds.core.estimators import split_coefficients
from agvm_ds.core.statistics import combine, gram, preconditioned_stats


@pytest.fixture(params=["fused", "torch"])
def use_native(request, monkeypatch):
    """Which path the statistics take; "fused" also proves the kernel really ran."""
    if request.param == "torch":
        yield False
        return
    assert native.kernels() is not None, "the fused kernel did not build on this machine"
    calls = []
    for name in ("gram", "preconditioned"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, __real=real, **k: calls.append(1) or __real(*a, **k))
    yield True
    assert calls, "the fused kernel was never called"


def _halves_micro(micro: list[torch.Tensor], a1: int):
    """Brute force: G1, G2 as plain means of the two groups of micro-batch gradients."""
    return torch.stack(micro[:a1]).mean(0), torch.stack(micro[a1:]).mean(0)


def _halves_ranks(ranks: list[torch.Tensor], n1: int):
    return torch.stack(ranks[:n1]).mean(0), torch.stack(ranks[n1:]).mean(0)


def _bruteforce(g1, g2):
    return torch.stack([torch.dot(g1, g2), torch.dot(g1, g1), torch.dot(g2, g2)])


def _close(got, ref, rtol):
    scale = ref.abs().max()
    assert float((got - ref).abs().max()) <= rtol * float(scale), (got, ref)


@pytest.mark.parametrize("A,a1", [(2, 1), (3, 1), (4, 2), (5, 3)])
def test_micro_split_matches_bruteforce(A, a1, use_native):
    gen = torch.Generator().manual_seed(100 + A)
    n = 20_011
    mean = torch.randn(n, generator=gen, dtype=torch.float64)
    micro = [mean + 2.0 * torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(A)]
    g = torch.stack(micro).mean(0)           # what DeepSpeed holds at the boundary
    s = torch.stack(micro[:a1]).sum(0) / A   # the running average snapshot after a1 micro-steps
    split = split_coefficients("micro", A, a1, 1, 0)
    got = combine(gram(g.float(), s.float(), use_native=use_native), split)
    ref = _bruteforce(*_halves_micro(micro, a1))
    _close(got, ref, 1e-6)


@pytest.mark.parametrize("N", [2, 3, 4, 7])
def test_ranks_split_matches_bruteforce(N, use_native):
    gen = torch.Generator().manual_seed(200 + N)
    n = 20_011
    mean = torch.randn(n, generator=gen, dtype=torch.float64)
    ranks = [mean + torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(N)]
    n1 = N // 2
    g = torch.stack(ranks).mean(0)
    s = torch.stack(ranks[:n1]).mean(0) - torch.stack(ranks[n1:]).mean(0)  # the signed stream's total
    got = combine(gram(g.float(), s.float(), use_native=use_native), split_coefficients("ranks", 1, 0, N, n1))
    _close(got, _bruteforce(*_halves_ranks(ranks, n1)), 1e-6)


def test_low_noise_cosine_keeps_its_digits(use_native):
    """1 − cos ≈ 1e-4: the quantity μ depends on must survive fp32 products."""
    gen = torch.Generator().manual_seed(7)
    n = 100_003
    mean = torch.randn(n, generator=gen, dtype=torch.float64)
    micro = [mean + 0.01 * torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(2)]
    g, s = torch.stack(micro).mean(0), micro[0] / 2
    d, n1, n2 = combine(gram(g.float(), s.float(), use_native=use_native),
                        split_coefficients("micro", 2, 1, 1, 0)).tolist()
    r12, r11, r22 = _bruteforce(*_halves_micro(micro, 1)).tolist()
    # inputs are rounded to fp32 before either computation sees them: compare on equal footing
    g32, s32 = g.float().double(), s.float().double()
    b12, b11, b22 = _bruteforce(2 * s32, 2 * (g32 - s32)).tolist()
    one_minus = 1 - d / (n1 * n2) ** 0.5
    ref = 1 - b12 / (b11 * b22) ** 0.5
    assert 1e-5 < ref < 1e-3
    assert abs(one_minus - ref) <= 1e-3 * ref, (one_minus, ref)
    assert abs(ref - (1 - r12 / (r11 * r22) ** 0.5)) <= 1e-2 * ref  # fp32 inputs alone cost < 1 %


def test_preconditioned_matches_bruteforce(use_native):
    gen = torch.Generator().manual_seed(11)
    n = 5_003
    N, n1, beta2, eps = 4, 2, 0.999, 1e-8
    mean = torch.randn(n, generator=gen, dtype=torch.float64) * 1e-3
    ranks = [mean + 1e-3 * torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(N)]
    v = torch.rand(n, generator=gen, dtype=torch.float64) * 1e-6
    g = torch.stack(ranks).mean(0)
    s = torch.stack(ranks[:n1]).mean(0) - torch.stack(ranks[n1:]).mean(0)
    got = preconditioned_stats(g.float(), s.float(), split_coefficients("ranks", 1, 0, N, n1), v.float(), beta2, eps,
                               use_native=use_native)
    h1, h2 = _halves_ranks(ranks, n1)

    def adam(x):  # written out independently: x / (sqrt(β2 v + (1 − β2) x²) + eps)
        return x / ((beta2 * v + (1 - beta2) * x * x) ** 0.5 + eps)
    _close(got, _bruteforce(adam(h1), adam(h2)), 1e-5)
    # no second moment yet (first step): v = 0
    got0 = preconditioned_stats(g.float(), s.float(), split_coefficients("ranks", 1, 0, N, n1), None, beta2, eps,
                                use_native=use_native)
    v.zero_()
    _close(got0, _bruteforce(adam(h1), adam(h2)), 1e-5)


def test_preconditioned_micro_split_and_slicing_match_bruteforce(use_native):
    """The micro split (G1 = (A/a1)·S) through the in-place path, with a workspace narrower
    than the vector so the slice loop runs."""
    from agvm_ds.core.statistics import workspace

    gen = torch.Generator().manual_seed(12)
    n, A, a1, beta2, eps = 3_001, 3, 1, 0.99, 1e-8
    mean = torch.randn(n, generator=gen, dtype=torch.float64) * 1e-3
    micro = [mean + 1e-3 * torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(A)]
    v = torch.rand(n, generator=gen, dtype=torch.float64) * 1e-6
    g, s = torch.stack(micro).mean(0), torch.stack(micro[:a1]).sum(0) / A
    work = workspace(1_000)[:, :1_000]
    got = preconditioned_stats(g.float(), s.float(), split_coefficients("micro", A, a1, 1, 0), v.float(), beta2, eps,
                               work, use_native=use_native)
    h1, h2 = _halves_micro(micro, a1)

    def adam(x):
        return x / ((beta2 * v + (1 - beta2) * x * x) ** 0.5 + eps)
    _close(got, _bruteforce(adam(h1), adam(h2)), 1e-5)
    _close(combine(gram(g.float(), s.float(), work, use_native=use_native),
                   split_coefficients("micro", A, a1, 1, 0)),
           _bruteforce(h1, h2), 1e-6)


def test_non_finite_input_gives_non_finite_sums_and_empty_gives_zero(use_native):
    g = torch.randn(10)
    g[3] = float("nan")
    assert not torch.isfinite(gram(g, torch.randn(10), use_native=use_native)).all()
    g[3] = float("inf")
    split = split_coefficients("micro", 2, 1, 1, 0)
    assert not torch.isfinite(combine(gram(g, torch.zeros(10), use_native=use_native), split)).all()
    for v in (None, torch.rand(10)):
        assert not torch.isfinite(preconditioned_stats(g, torch.randn(10), split, v, 0.999, 1e-8,
                                                       use_native=use_native)).all()
    v = torch.rand(10)
    v[5] = float("nan")
    assert not torch.isfinite(preconditioned_stats(torch.randn(10), torch.randn(10), split, v, 0.999, 1e-8,
                                                   use_native=use_native)).all()
    empty = torch.zeros(0)
    assert torch.equal(gram(empty, empty, use_native=use_native), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(preconditioned_stats(empty, empty, split, None, 0.999, 1e-8, use_native=use_native),
                       torch.zeros(3, dtype=torch.float64))


def test_bad_splits_are_rejected():
    with pytest.raises(ValueError, match="micro split"):
        split_coefficients("micro", 2, 2, 1, 0)
    with pytest.raises(ValueError, match="ranks split"):
        split_coefficients("ranks", 1, 0, 1, 0)
    with pytest.raises(ValueError, match="unknown estimator"):
        split_coefficients("halves", 2, 1, 2, 1)
