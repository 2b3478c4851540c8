"""The CI slice of bench/conformance.py (issue 23, item 3): a pairwise covering array over
the factors that move gradients most, on 2 gloo ranks; every cell exact or refused, never
the third kind. The full matrix: ``python bench/conformance.py`` (docs/conformance.md)."""

from __future__ import annotations

import pytest

from conformance_cases import C, SLICE, slice_cells  # C: bench/conformance.py


def test_covering_array_covers_every_pair_of_the_pool():
    chosen, pool = slice_cells()
    want = set().union(*(C.pairs(c, list(SLICE)) for c in pool))
    got = set().union(*(C.pairs(c, list(SLICE)) for c in chosen))
    assert want == got and len(chosen) < len(pool) / 4, (len(chosen), len(pool))
    # a refused pair (bf16 + fp32 accumulation at stage 0) is not in the pool: the classifier says why
    msg = C.refused(C.cell_of(stage=0, precision="bf16+fp32acc", gas=2, world=2))
    assert msg.startswith("data_types.grad_accum_dtype:")
    assert C.pruned(C.cell_of(stage=0, overlap_comm=True), False).startswith("overlap_comm has no effect at ZeRO-0")


@pytest.fixture(scope="module")
def results(ci_conformance):
    """The slice's cells (conformance_cases.ci_cells), run in the launch shared with the mutation suite."""
    return ci_conformance[0]


def test_conformance_slice_has_no_third_kind(results):
    for r in results:
        print(C.key(r["cell"]), r["verdict"], [c[:2] for c in r.get("checks", [])] or r.get("message"), r["seconds"])
    bad = [(C.key(r["cell"]), r.get("message") or [c[2] for c in r["checks"] if not c[0]])
           for r in results if r["verdict"] == "THIRD KIND"]
    assert not bad, bad
    refused = [r for r in results if r["verdict"] == "refused"]
    assert [(r["cell"]["stage"], r["cell"]["precision"]) for r in refused] == [(0, "bf16+fp32acc")]
    assert refused[0]["message"].startswith("data_types.grad_accum_dtype:")
    exact = [r for r in results if r["verdict"] == "exact"]
    assert {r["cell"]["stage"] for r in exact} == {0, 1, 2, 3}
    # the fault rows: a NaN micro-batch on update step 1 is skipped by DeepSpeed/AGVM, μ unchanged
    faulted = [r for r in results if r["cell"].get("nan")]
    assert len(faulted) == len(C.FAULT_ROWS) and all(r["verdict"] == "exact" for r in faulted), faulted
    assert all("unchanged over skipped steps [1]" in r["checks"][2][2] for r in faulted), faulted
