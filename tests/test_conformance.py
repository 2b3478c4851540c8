"""The CI slice of bench/conformance.py (issue 23, item 3): a pairwise covering array over
the factors that move gradients most, on 2 gloo ranks; every cell exact or refused, never
the third kind. The full matrix: ``python bench/conformance.py`` (docs/conformance.md)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import conformance as C  # noqa: E402

from agvm_ds.testing.distributed import run_distributed  # noqa: E402

#: the slice: every pair of these values at least once; the other factors at their first value
SLICE = {"stage": [0, 1, 2, 3], "offload": ["none", "optimizer"], "overlap_comm": [False, True],
         "precision": ["fp32", "bf16", "bf16+fp32acc", "fp16", "autocast-fp16"],
         "estimator": ["micro", "ranks"], "gas": [1, 2, 3], "base": ["SGD", "AdamW"]}
#: DeepSpeed's fp16 optimizers run on the CPU accelerator here (bench/conformance.py's probe patch)
FP16_ON_CPU = True


def _slice_cells():
    pool = []
    for values in itertools.product(*SLICE.values()):
        cell = C.cell_of(world=2, **dict(zip(SLICE, values)))
        if not C.pruned(cell, fp16_on_cpu=FP16_ON_CPU) and not C.refused(cell):
            pool.append(cell)
    return C.covering(pool, names=list(SLICE)), pool


def test_covering_array_covers_every_pair_of_the_pool():
    chosen, pool = _slice_cells()
    want = set().union(*(C.pairs(c, list(SLICE)) for c in pool))
    got = set().union(*(C.pairs(c, list(SLICE)) for c in chosen))
    assert want == got and len(chosen) < len(pool) / 4, (len(chosen), len(pool))
    # a refused pair (bf16 + fp32 accumulation at stage 0) is not in the pool: the classifier says why
    msg = C.refused(C.cell_of(stage=0, precision="bf16+fp32acc", gas=2, world=2))
    assert msg.startswith("data_types.grad_accum_dtype:")
    assert C.pruned(C.cell_of(stage=0, overlap_comm=True), False).startswith("overlap_comm has no effect at ZeRO-0")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    chosen, _ = _slice_cells()
    # plus issue 23's rows, the cells the full matrix found, and one refused cell, run:
    # agvm_ds.initialize must refuse it the same way
    cells = chosen + [C.cell_of(**row) for row in C.ISSUE_ROWS + C.FOUND_ROWS + C.FAULT_ROWS]
    cells += [C.cell_of(stage=0, precision="bf16+fp32acc", gas=2, world=2)]
    cells.sort(key=lambda c: c["precision"].startswith("autocast"))
    progress = tmp_path_factory.mktemp("conformance") / "progress.jsonl"
    return run_distributed(C.run_cells, 2, cells, str(progress), FP16_ON_CPU, timeout=300)[0]


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
