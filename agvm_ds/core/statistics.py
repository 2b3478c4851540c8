"""The G1/G2 statistics of one slice of the gradient, from the two vectors a rank holds.

Pure tensor math, no torch.distributed. On an update step a rank holds, for the elements
it owns, the averaged gradient ``G`` and one more vector ``S``:

* ``micro``: ``S`` is the averaged running sum after the first a1 of A micro-batches, so
  ``G1 = (A/a1)·S`` and ``G2 = A/(A−a1)·(G − S)``;
* ``ranks``: ``S = G1 − G2`` (the signed stream), so with n1 of N ranks in the first half
  ``G1 = G + (n2/N)·S`` and ``G2 = G − (n1/N)·S``.

Either way the halves are linear in (G, S)::

    G1 = a1·G + b1·S,    G2 = a2·G + b2·S                       (:class:`Split`)

with coefficients each estimator supplies (:mod:`agvm_ds.core.estimators`), so nothing
here depends on which one runs, and ⟨G1,G2⟩, |G1|², |G2|² are a fixed quadratic form in
the three sums Σ G², Σ G·S, Σ S² (:func:`combine`). Those are taken with fp32 products and float64 accumulation
(:func:`gram`): no float64 copy of the slice and no G1/G2 buffers, three passes over P/N
elements instead of eight. Each sum is within ~10⁻⁶·Σ|xᵢyᵢ| of exact in the worst case
(:func:`_row_sums`), so the cosine is good to ~10⁻⁶ absolute: far inside the 10⁻⁴ the
tests ask, and at the scale of the modulator's ε = 10⁻⁶ on Φ = 1 − cos.

With Adam preconditioning the halves pass through an element-wise non-linearity, so
:func:`preconditioned_stats` forms them explicitly (fp32) and then reduces the same way.

On contiguous fp32 CPU tensors both functions run a fused C kernel instead
(:mod:`agvm_ds.core.native`: one read of each input, float64 products and sums); the torch
code below is the fallback and the reference the kernel is tested against.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import math

import torch

from agvm_ds.core import native


class Split(NamedTuple):
    """G1 = a1·G + b1·S and G2 = a2·G + b2·S (from an estimator's ``coefficients``)."""

    a1: float
    b1: float
    a2: float
    b2: float


#: Elements per fp32 partial sum; the partials are added in float64.
BLOCK = 1024
#: Largest slice processed at once: bounds the scratch buffers (3 × 4 MiB in fp32).
SLICE = 1 << 20


def workspace(numel: int, device=None) -> torch.Tensor:
    """Scratch for the functions below, reused across a step's chunks: three fp32 rows of
    up to ``SLICE`` elements. Fresh multi-MiB temporaries per operation cost a page fault
    per 4 KiB on first touch, which on a CPU dominated the pass; and writing the three
    products into the rows of one tensor lets one reduction finish all three sums."""
    return torch.empty(3, max(1, min(int(numel), SLICE)), dtype=torch.float32, device=device)


def _row_sums(rows: torch.Tensor) -> torch.Tensor:
    """float64 ``[3]``: each row's sum, in fp32 (cascade) over blocks of ``BLOCK`` elements
    and in float64 over the blocks — 2.5× faster on a CPU than a float64 accumulation of
    every element, and within ~10⁻⁶·Σ|xᵢ| of exact in the worst case (~10⁻¹⁰ measured)."""
    n = rows.shape[1]
    whole = (n // BLOCK) * BLOCK
    total = rows[:, whole:].sum(dim=1, dtype=torch.float64)
    if whole:
        total += rows[:, :whole].view(rows.shape[0], -1, BLOCK).sum(dim=2).sum(dim=1, dtype=torch.float64)
    return total


def _slices(n: int, width: int):
    for lo in range(0, n, width):
        yield lo, min(n, lo + width)


def _kernel(use_native: bool, *tensors: Optional[torch.Tensor]):
    return native.kernels() if use_native and native.accepts(*tensors) else None


def gram(g: torch.Tensor, s: torch.Tensor, work: Optional[torch.Tensor] = None,
         use_native: bool = True) -> torch.Tensor:
    """float64 ``[Σ G², Σ G·S, Σ S²]`` of two equally long fp32 vectors (``work``: see
    :func:`workspace`; only the torch path uses it)."""
    total = torch.zeros(3, dtype=torch.float64, device=g.device)
    if g.numel() == 0:
        return total
    lib = _kernel(use_native, g, s)
    if lib is not None:
        return native.gram(lib, g, s)
    work = workspace(g.numel(), g.device) if work is None else work
    for lo, hi in _slices(g.numel(), work.shape[1]):
        gb, sb, rows = g[lo:hi], s[lo:hi], work[:, : hi - lo]
        torch.mul(gb, gb, out=rows[0])
        torch.mul(gb, sb, out=rows[1])
        torch.mul(sb, sb, out=rows[2])
        total += _row_sums(rows)
    return total


def combine(sums: torch.Tensor, split: Split) -> torch.Tensor:
    """``[..., (ΣG², ΣG·S, ΣS²)]`` → ``[..., (⟨G1,G2⟩, |G1|², |G2|²)]``."""
    gg, gs, ss = sums.unbind(-1)
    a1, b1, a2, b2 = split
    return torch.stack([a1 * a2 * gg + (a1 * b2 + b1 * a2) * gs + b1 * b2 * ss,
                        a1 * a1 * gg + 2.0 * a1 * b1 * gs + b1 * b1 * ss,
                        a2 * a2 * gg + 2.0 * a2 * b2 * gs + b2 * b2 * ss], dim=-1)


def _linear_into(out: torch.Tensor, g: torch.Tensor, s: torch.Tensor, a: float, b: float) -> None:
    """out ← a·g + b·s in one pass."""
    if a == 0.0:
        torch.mul(s, b, out=out)
    elif a == 1.0:
        torch.add(g, s, alpha=b, out=out)
    else:
        torch.mul(g, a, out=out).add_(s, alpha=b)


def _precondition_into(x: torch.Tensor, v: Optional[torch.Tensor], c: float, eps: float, den: torch.Tensor) -> None:
    """x ← x / (sqrt(v + c·x²) + eps), in place (den is scratch)."""
    if v is None:
        torch.mul(x, x, out=den).mul_(c)
    else:
        torch.addcmul(v, x, x, value=c, out=den)
    x.div_(den.sqrt_().add_(eps))


def preconditioned_stats(g: torch.Tensor, s: torch.Tensor, split: Split, exp_avg_sq: Optional[torch.Tensor],
                         beta2: float, eps: float, work: Optional[torch.Tensor] = None,
                         use_native: bool = True) -> torch.Tensor:
    """float64 ``[⟨Ĝ1,Ĝ2⟩, |Ĝ1|², |Ĝ2|²]`` with both halves Adam-preconditioned.

    Written as ĝ = β2^(−1/2) · x / (sqrt(v + c·x²) + eps'), c = (1 − β2)/β2,
    eps' = eps/√β2, so no scaled copy of v is needed; the factor comes back as 1/β2 on the
    sums. Everything runs in place in the three scratch rows: Ĝ1, Ĝ2, and the denominator,
    which then takes Ĝ1·Ĝ2 while the other two rows are squared in place. A scale on the
    gradients (fp16's 1/loss-scale) belongs in ``split``: scaling all four coefficients
    scales G and S without copying them."""
    total = torch.zeros(3, dtype=torch.float64, device=g.device)
    if g.numel() == 0:
        return total
    if not 0.0 < beta2 < 1.0:
        raise ValueError(f"beta2 must be in (0, 1) for preconditioning, got {beta2}")
    c, eps_ = (1.0 - beta2) / beta2, eps / math.sqrt(beta2)
    lib = _kernel(use_native, g, s, exp_avg_sq)
    if lib is not None:
        return native.preconditioned(lib, g, s, exp_avg_sq, tuple(split), c, eps_) / beta2
    work = workspace(g.numel(), g.device) if work is None else work
    a1, b1, a2, b2 = split
    for lo, hi in _slices(g.numel(), work.shape[1]):
        rows = work[:, : hi - lo]
        h1, h2, den = rows.unbind(0)
        gb, sb = g[lo:hi], s[lo:hi]
        vb = None if exp_avg_sq is None else exp_avg_sq[lo:hi]
        _linear_into(h1, gb, sb, a1, b1)
        _precondition_into(h1, vb, c, eps_, den)
        _linear_into(h2, gb, sb, a2, b2)
        _precondition_into(h2, vb, c, eps_, den)
        torch.mul(h1, h2, out=den)
        h1.mul_(h1)
        h2.mul_(h2)
        total += _row_sums(rows)[[2, 0, 1]]
    return total / beta2
