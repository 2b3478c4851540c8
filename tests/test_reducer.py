"""OwnerReducer: the owned sums equal Σ_r c_r·g_r computed by hand (real gloo ranks), and the
per-bucket rule picks the collectives worked out by hand (a recording stand-in for
torch.distributed, one process)."""

from __future__ import annotations

import math

import pytest
import torch

from agvm_ds.testing.distributed import run_distributed
from agvm_ds.testing.recording import RecordingComm
from reducer_cases import layout_for, stream_cases

SIZES = [7, 1, 40, 13, 64, 5, 33]


def _cases(world):
    # bucket 12 → 5-element fill buffer: dozens of buckets, parameters cut in every way;
    # bucket 60 → 26 elements: buckets spanning several parameters (reduce-scatter).
    cases = [dict(sizes=SIZES, bucket=b, rounds=2, missing=3, kind=kind) for kind in ("even", "flat") for b in (12, 60)]
    cases.append(dict(sizes=SIZES, bucket=60, rounds=2, missing=3, kind="even", scatter=False))
    return cases


@pytest.mark.parametrize("world", [2, 3, 4])
def test_owner_reduction_matches_bruteforce(world):
    cases = _cases(world)
    out = run_distributed(stream_cases, world, cases)
    for c, case in enumerate(cases):
        for rank in range(world):
            res = out[rank][c]
            acc = res["acc"].double()
            owned = sum(hi - lo for pieces in res["pieces"] for r, lo, hi, _ in pieces if r == rank)
            assert owned > 0
            for i, pieces in enumerate(res["pieces"]):
                total = torch.zeros(SIZES[i], dtype=torch.float64)
                for other in out:  # brute force: every rank's weighted gradients, every micro-batch
                    for grads in other[c]["sent"]:
                        if grads[i] is not None:
                            total += other[c]["coeff"] * grads[i].double()
                for r, lo, hi, acc_lo in pieces:
                    if r == rank:
                        got = acc[acc_lo: acc_lo + hi - lo]
                        assert torch.allclose(got, total[lo:hi], rtol=1e-5, atol=1e-6), (case, rank, i)
            # the accumulator plus at most one bucket of fill and send buffers
            assert res["peak_bytes"] <= (acc.numel() + case["bucket"]) * 4, case
        calls = out[0][c]["calls"]
        if case.get("scatter", True) and case["kind"] == "even" and case["bucket"] == 60:
            assert calls["reduce_scatter"] > 0, (case, calls)
        if not case.get("scatter", True):
            assert calls["reduce_scatter"] == 0 and calls["reduce"] > 0


def _run(sizes, kind, fill_cap, scatter=True, order=None):
    from agvm_ds.core.reducer import SCATTER_PAD, OwnerReducer

    layout, params, local = layout_for(sizes, 4, kind)
    rec = RecordingComm(world=4)
    red = OwnerReducer(layout, 0, 4, math.ceil(fill_cap * (1 + SCATTER_PAD)), scatter=scatter, comm=rec)
    assert red.fill_cap == min(fill_cap, sum(sizes))
    red.start(local[0])
    for i in order or range(len(params)):
        red.add(params[i], torch.ones(sizes[i]), 1.0)
    red.wait()
    return rec.log


def test_rule_even_split_is_one_reduce_scatter_per_bucket():
    # 3 parameters of 16 = 4 ranks × 4; a 24-element bucket: whole parameters, then the
    # third cut across its rows (4 × 2 in the first bucket, 4 × 2 in the second).
    assert _run([16, 16, 16], "even", 24) == [("reduce_scatter", 24, None), ("reduce_scatter", 24, None)]
    # without reduce-scatter: every owner of every bucket gets a reduce of its 6 elements
    assert _run([16, 16, 16], "even", 24, scatter=False) == [("reduce", 6, r) for r in range(4)] * 2


def test_rule_flat_partitions_reduce_to_the_owners_they_touch():
    # ZeRO-1/2: groups [10, 10] and [10, 10] → partitions of 5 per group; a 10-element bucket
    # holds one parameter = partitions of 2 ranks in equal shares: padded 4 × 5 > 1.25 × 10.
    log = _run([10, 10, 10, 10], "flat", 10)
    assert log == [("reduce", 5, 0), ("reduce", 5, 1), ("reduce", 5, 2), ("reduce", 5, 3)] * 2
    # in backward (reverse) order the same buckets, owners reversed per parameter pair
    log = _run([10, 10, 10, 10], "flat", 10, order=[3, 2, 1, 0])
    assert sorted(log) == sorted([("reduce", 5, 0), ("reduce", 5, 1), ("reduce", 5, 2), ("reduce", 5, 3)] * 2)
    # a bucket holding a whole group covers every partition equally: one reduce-scatter
    assert _run([10, 10, 10, 10], "flat", 20) == [("reduce_scatter", 20, None)] * 2


def test_rule_unbalanced_bucket_falls_back_to_reduces():
    # even split of 3 elements over 4 ranks: owners 0..2 one element each; with the
    # 8-element parameter (2 per rank) the bucket is 11 elements, rows 3,3,3,2:
    # padded 4 × 3 = 12 ≤ 1.25 × 11 → reduce-scatter; the 3-element one alone
    # (4 × 1 = 4 > 1.25 × 3) → 3 reduces.
    assert _run([3, 8], "even", 11) == [("reduce_scatter", 12, None)]
    assert _run([3], "even", 11) == [("reduce", 1, 0), ("reduce", 1, 1), ("reduce", 1, 2)]
