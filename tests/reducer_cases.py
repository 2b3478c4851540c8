"""Rank-side code for tests/test_reducer.py (module-level so spawned ranks can import it)."""

from __future__ import annotations

import torch


def layout_for(sizes: list[int], world: int):
    """Split every parameter into ``world`` near-equal slices, owner-major local offsets."""
    from agvm_ds.core.adapters import Piece, _even_split

    offsets = [0] * world
    layout, params = {}, []
    for numel in sizes:
        p = torch.nn.Parameter(torch.zeros(numel))
        pieces = []
        for r, lo, hi in _even_split(numel, world):
            pieces.append(Piece(r, lo, hi, offsets[r]))
            offsets[r] += hi - lo
        layout[id(p)] = pieces
        params.append(p)
    return layout, params, offsets


def stream(rank: int, world: int, sizes: list[int], bucket: int, rounds: int, missing: int):
    """Every rank streams c_r · g_r for each parameter, ``rounds`` times (micro-batches),
    through a reducer with a tiny bucket (many flushes, both buffer generations in use).
    Parameter ``missing`` has no gradient on rank 0. Returns the accumulator and the inputs."""
    from agvm_ds.core.reducer import OwnerReducer

    layout, params, offsets = layout_for(sizes, world)
    red = OwnerReducer(layout, rank, world, bucket)
    red.start(offsets[rank])
    coeff = 1.0 / (rank + 1) - 0.3
    sent = []
    for k in range(rounds):
        grads = []
        for i, p in enumerate(params):
            g = torch.Generator().manual_seed(1000 * k + 10 * i + rank)
            grad = None if (i == missing and rank == 0) else torch.randn(p.numel(), generator=g)
            red.add(p, grad, coeff)
            grads.append(grad)
        red.flush()  # one micro-batch's backward ends; its last sends stay in flight
        sent.append(grads)
    red.wait()
    return {"acc": red.acc.clone(), "coeff": coeff, "sent": sent,
            "pieces": [[(pc.rank, pc.p_lo, pc.p_hi, pc.acc_lo) for pc in layout[id(p)]] for p in params],
            "peak_bytes": red.buffer_bytes()}
