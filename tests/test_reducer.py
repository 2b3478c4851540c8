"""OwnerReducer on real gloo ranks: the owned sums equal Σ_r c_r·g_r computed by hand."""

from __future__ import annotations

import pytest
import torch

from agvm_ds.testing.distributed import run_distributed
from reducer_cases import stream


@pytest.mark.parametrize("world", [2, 3])
def test_async_owner_reduction_matches_bruteforce(world):
    sizes = [7, 1, 40, 13, 64, 5]
    bucket, rounds, missing = 12, 2, 3  # capacity 12 // (world · 2) elements: dozens of flushes
    out = run_distributed(stream, world, sizes, bucket, rounds, missing)
    for rank, res in enumerate(out):
        acc = res["acc"].double()
        assert acc.numel() == sum(hi - lo for pieces in res["pieces"] for r, lo, hi, _ in pieces if r == rank)
        for i, pieces in enumerate(res["pieces"]):
            total = torch.zeros(sizes[i], dtype=torch.float64)
            for other in out:  # brute force: every rank's weighted gradients, every micro-batch
                for grads in other["sent"]:
                    if grads[i] is not None:
                        total += other["coeff"] * grads[i].double()
            for r, lo, hi, acc_lo in pieces:
                if r == rank:
                    got = acc[acc_lo: acc_lo + hi - lo]
                    assert torch.allclose(got, total[lo:hi], rtol=1e-5, atol=1e-6), (rank, i, got, total[lo:hi])
        # the accumulator plus at most one bucket of send buffers (two half-size generations)
        assert res["peak_bytes"] <= (acc.numel() + bucket) * 4
