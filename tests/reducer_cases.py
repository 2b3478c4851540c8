"""Rank-side code for tests/test_reducer.py (module-level so spawned ranks can import it)."""

from __future__ import annotations

import math

import torch


def layout_for(sizes: list[int], world: int, kind: str = "even"):
    """The two ownership layouts of agvm_ds.core.adapters, rebuilt here from their definition.

    ``even``: every parameter split into ``world`` slices of ⌈n/world⌉ (stages 0 and 3),
    owner-major local offsets. ``flat``: ZeRO-1/2 — the parameters of each of two groups
    concatenated, padded to a multiple of ``world``, cut into equal partitions."""
    from agvm_ds.core.adapters import Piece

    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    layout = {}
    if kind == "even":
        offsets = [0] * world
        for p in params:
            part, pieces = math.ceil(p.numel() / world), []
            for r in range(world):
                lo, hi = r * part, min(p.numel(), (r + 1) * part)
                if lo < hi:
                    pieces.append(Piece(r, lo, hi, offsets[r]))
                    offsets[r] += hi - lo
            layout[id(p)] = pieces
        return layout, params, offsets
    groups = [params[: len(params) // 2], params[len(params) // 2:]]
    base = 0
    for g in groups:
        total = sum(p.numel() for p in g)
        ps = math.ceil(total / world)
        off = 0
        for p in g:
            pieces = []
            for r in range(world):
                lo, hi = max(off, r * ps), min(off + p.numel(), (r + 1) * ps)
                if lo < hi:
                    pieces.append(Piece(r, lo - off, hi - off, base + lo - r * ps))
            layout[id(p)] = pieces
            off += p.numel()
        base += ps
    return layout, params, [base] * world  # every rank's local layout: its partition of each group


def stream(rank: int, world: int, sizes: list[int], bucket: int, rounds: int, missing: int,
           kind: str = "even", scatter: bool = True):
    """Every rank streams c_r · g_r for each parameter, ``rounds`` times (micro-batches; odd
    rounds in reverse order, as backward hooks fire), through a reducer with a tiny bucket
    (many buckets, parameters cut). Parameter ``missing`` has no gradient on rank 0."""
    from agvm_ds.core.reducer import OwnerReducer

    layout, params, local = layout_for(sizes, world, kind)
    red = OwnerReducer(layout, rank, world, bucket, scatter=scatter)
    red.start(local[rank])
    coeff = 1.0 / (rank + 1) - 0.3
    sent = []
    peak = 0
    for k in range(rounds):
        grads = [None] * len(params)
        order = range(len(params)) if k % 2 == 0 else reversed(range(len(params)))
        for i in order:
            g = torch.Generator().manual_seed(1000 * k + 10 * i + rank)
            grad = None if (i == missing and rank == 0) else torch.randn(params[i].numel(), generator=g)
            red.add(params[i], grad, coeff)
            grads[i] = grad
            peak = max(peak, red.buffer_bytes())
        red.flush()  # one micro-batch's backward ends; its last sends stay in flight
        peak = max(peak, red.buffer_bytes())
        sent.append(grads)
    red.wait()
    return {"acc": red.acc.clone(), "coeff": coeff, "sent": sent, "calls": dict(red.calls),
            "pieces": [[(pc.rank, pc.p_lo, pc.p_hi, pc.acc_lo) for pc in layout[id(p)]] for p in params],
            "peak_bytes": peak}


def stream_cases(rank: int, world: int, cases: list[dict]):
    return [stream(rank, world, **case) for case in cases]
