"""chunks.coalesce: merged chunks equal a naive concatenation; nothing lost or reordered."""

from __future__ import annotations

import random

import torch

from agvm_ds.core.chunks import Chunk, coalesce


def _random_chunks(seed: int):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    chunks, lo = [], 0
    for _ in range(60):
        n = rng.choice([1, 3, 7, 20, 45, 90])
        module, group = rng.randrange(3), rng.randrange(2)
        if rng.random() < 0.2:
            lo += rng.randrange(1, 5)  # a gap in the layout: never merged across
        grad = torch.randn(n, generator=gen)
        if rng.random() < 0.3:
            grad = grad.to(torch.bfloat16).float()[: n]  # a non-contiguous-source stand-in
        v = None if rng.random() < 0.3 else torch.rand(n, generator=gen)
        chunks.append(Chunk(module, group, lo, lo + n, grad, v))
        lo += n
    return chunks


def test_coalesced_chunks_cover_the_same_elements_in_order():
    for seed in range(5):
        raw = _random_chunks(seed)
        width = 64
        out = []
        for ch in coalesce(iter(raw), width):  # copy at once: staging buffers are reused
            out.append(Chunk(ch.module, ch.group, ch.lo, ch.hi, ch.grad.clone(),
                             None if ch.second_moment is None else ch.second_moment.clone()))
        assert len(out) < len(raw)
        # every raw chunk's elements appear once, at its layout position, with its module/group
        by_pos = {}
        for ch in out:
            assert ch.grad.numel() == ch.hi - ch.lo
            assert ch.hi - ch.lo <= width or any(r.lo == ch.lo and r.hi == ch.hi for r in raw)
            for k in range(ch.lo, ch.hi):
                assert k not in by_pos
                v = None if ch.second_moment is None else float(ch.second_moment[k - ch.lo])
                by_pos[k] = (ch.module, ch.group, float(ch.grad[k - ch.lo]), v)
        for r in raw:
            for k in range(r.lo, r.hi):
                m, g, val, v = by_pos[k]
                assert (m, g, val) == (r.module, r.group, float(r.grad[k - r.lo]))
                if r.second_moment is None:
                    assert v in (None, 0.0)  # missing Adam state reads as zeros inside a merged run
                else:
                    assert v == float(r.second_moment[k - r.lo])
        assert sum(r.hi - r.lo for r in raw) == len(by_pos)


def test_large_chunks_pass_through_without_a_copy():
    big = Chunk(0, 0, 0, 100, torch.randn(100), None)
    small = Chunk(0, 0, 100, 110, torch.randn(10), None)
    out = list(coalesce(iter([big, small]), 64))
    assert out[0] is big and out[1] is small
