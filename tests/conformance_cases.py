"""The CI conformance slice and the mutation suite, run in one launch of 2 gloo ranks.

tests/test_conformance.py (the slice: every cell exact or refused) and tests/test_mutations.py
(every planted bug caught) share :func:`launch` through the session fixture in conftest.py:
process start-up and the first engine (which imports torch._dynamo) are paid once for both.
Rank-side code is module-level so spawned ranks can import it.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import conformance as C  # noqa: E402

#: the slice: every pair of these values at least once; the other factors at their first value
SLICE = {"stage": [0, 1, 2, 3], "offload": ["none", "optimizer"], "overlap_comm": [False, True],
         "precision": ["fp32", "bf16", "bf16+fp32acc", "fp16", "autocast-fp16"],
         "estimator": ["micro", "ranks"], "gas": [1, 2, 3], "base": ["SGD", "AdamW"]}
#: DeepSpeed's fp16 optimizers run on the CPU accelerator here (bench/conformance.py's probe patch)
FP16_ON_CPU = True


def slice_cells():
    """(the covering array over :data:`SLICE`, the pool of runnable cells it covers)."""
    pool = []
    for values in itertools.product(*SLICE.values()):
        cell = C.cell_of(world=2, **dict(zip(SLICE, values)))
        if not C.pruned(cell, fp16_on_cpu=FP16_ON_CPU) and not C.refused(cell):
            pool.append(cell)
    return C.covering(pool, names=list(SLICE)), pool


def ci_cells():
    """What the CI slice runs: the covering array, issue 23's rows, the cells the full matrix
    found, the fault rows, and one refused cell (``agvm_ds.initialize`` must refuse it too);
    autocast cells last (DeepSpeed's autocast state is process-global)."""
    chosen, _ = slice_cells()
    cells = chosen + [C.cell_of(**row) for row in C.ISSUE_ROWS + C.FOUND_ROWS + C.FAULT_ROWS]
    cells += [C.cell_of(stage=0, precision="bf16+fp32acc", gas=2, world=2)]
    cells.sort(key=lambda c: c["precision"].startswith("autocast"))
    return cells


# -- the mutation suite's plan ---------------------------------------------------------
QUICKSTART = json.loads((REPO / "ds_configs" / "quickstart.json").read_text())
OFFLOAD = json.loads((REPO / "ds_configs" / "selfcheck" / "zero2_offload.json").read_text())
PRECISION = {"fp32": {}, "bf16": {"bf16": {"enabled": True}},
             "autocast-fp16": {"torch_autocast": {"enabled": True, "dtype": "float16"}},
             "fp16": {"fp16": {"enabled": True, "initial_scale_power": 8}}}


def _any(c):
    return True


def _streams_through_layout(c):
    """AGVM sends S to owners through the flat ZeRO-1/2 layout: ranks split, or micro at ZeRO-1."""
    return c["stage"] in (1, 2) and (c["estimator"] == "ranks" or c["gas"] == 1 or c["stage"] == 1)


#: mutation → (precisions it is checked in, which slice cells can see it, the self-check's
#: run file: the quickstart with these keys, or the shipped ZeRO-2 offload file)
PLAN = {
    "micro_late": (("fp32", "bf16"), lambda c: c["estimator"] == "micro" and c["gas"] >= 3,
                   {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3, "agvm": {"estimator": "micro"}}),
    "owner_next": (("fp32", "bf16"), _streams_through_layout, {}),
    "pair_x1.01": (("fp32", "bf16"), _any, {}),
    "pair_x1.05": (("fp32", "bf16"), _any, {}),
    "halves_swapped": (("fp32", "bf16"), _any, {}),
    "rank_dropped": (("fp32", "bf16"), _any, {}),
    "autocast_scaler_ignored": (("autocast-fp16",), lambda c: c["base"] == "AdamW", {}),
    "fp16_scale_ignored": (("fp16",), lambda c: c["base"] == "AdamW" and c["stage"] >= 1, {}),
    "offload_stale": (("fp32", "bf16"), lambda c: c["offload"] == "optimizer" and c["stage"] == 2
                      and c["estimator"] == "micro" and c["gas"] >= 2, "offload"),
    "skipped_counted": (("fp32", "bf16"), lambda c: bool(c.get("nan")), {}),
}
NAN_AT = (1, 0, 0)  # the self-check's fault for skipped_counted: step 1, rank 0, first micro-batch


def _precision_class(c):
    return {"bf16+fp32acc": "bf16"}.get(c["precision"], c["precision"])


def run_file(mutation, precision):
    """The self-check's run file for ``mutation`` in ``precision``."""
    over = PLAN[mutation][2]
    run = copy.deepcopy(OFFLOAD if over == "offload" else QUICKSTART)
    over = over if isinstance(over, dict) else {}
    if "gradient_accumulation_steps" in over:
        run.pop("train_batch_size", None)
    for k, v in over.items():
        run[k] = {**run.get(k, {}), **v} if isinstance(v, dict) else v
    run.update(copy.deepcopy(PRECISION[precision]))
    return run


def mutation_entries(cells):
    """(mutation, precision, "CI slice" | "self-check", "cell" | "selfcheck", payload) of every
    mutated run: per mutation and precision, the first of the CI slice's ``cells`` that can
    see the bug, and the self-check on its run file."""
    out = []
    for mutation, (precisions, sees, _) in PLAN.items():
        for prec in precisions:
            cell = next((c for c in cells if _precision_class(c) == prec and sees(c)), None)
            if cell is None:
                raise AssertionError(f"the CI slice has no {prec} cell that can see {mutation}")
            out.append((mutation, prec, "CI slice", "cell", cell))
            nan_at = NAN_AT if mutation == "skipped_counted" else None
            out.append((mutation, prec, "self-check", "selfcheck", (run_file(mutation, prec), nan_at)))
    return out


def control_entries(entries):
    """Each distinct self-check run of ``entries`` once (run with no mutation)."""
    out, seen = [], set()
    for e in entries:
        k = json.dumps([e[3], e[4]], sort_keys=True, default=str)
        if e[3] == "selfcheck" and k not in seen:
            seen.add(k)
            out.append(e)
    return out


def launch(progress: str):
    """One launch: the CI slice's cells, then the controls, then every mutated run.
    Returns (slice results, [(control entry, result)], [(mutated entry, result)])."""
    from agvm_ds.testing.distributed import run_distributed

    cells = ci_cells()
    entries = mutation_entries(cells)
    controls = control_entries(entries)
    plan = [(None, e[3], e[4]) for e in controls] + [(e[0], e[3], e[4]) for e in entries]
    slice_results, plan_results = run_distributed(run_all, 2, cells, progress, plan, timeout=600)[0]
    n = len(controls)
    return slice_results, list(zip(controls, plan_results[:n])), list(zip(entries, plan_results[n:]))


def run_all(rank, world, cells, progress, plan):
    """Rank side: the slice's cells (bench/conformance.py's ``run_cells``), then ``plan``."""
    return C.run_cells(rank, world, cells, progress, FP16_ON_CPU), run_plan(rank, world, plan)


def run_plan(rank, world, plan):
    """Each entry ``(mutation or None, "cell", conformance cell)`` or ``(mutation or None,
    "selfcheck", (run dict, nan_at))`` → ``{"verdict", "checks" or "message", "seconds"}``,
    with ``AGVM_DS_MUTATION`` set to the mutation (unset for None) in this process."""
    import deepspeed.runtime.torch_autocast as ds_autocast

    from agvm_ds.errors import ConfigError
    from agvm_ds.selfcheck import run, selfcheck_config
    from agvm_ds.mutations import ENV

    out = []
    for mutation, what, payload in plan:
        if mutation:
            os.environ[ENV] = mutation
        else:
            os.environ.pop(ENV, None)
        t0 = time.perf_counter()
        if what == "cell":  # the CI slice's own rank function, one cell
            res = C.run_cells(rank, world, [payload], os.devnull, True)[0]
        else:
            run_dict, nan_at = payload
            ds_autocast.TORCH_AUTOCAST_INITIALIZED, ds_autocast.TORCH_AUTOCAST_DTYPE = False, None
            try:
                checks = run(selfcheck_config(run_dict, world), rank, world, steps=4, nan_at=nan_at)
                res = {"verdict": "exact" if all(ok for ok, *_ in checks) else "THIRD KIND",
                       "checks": [[ok, worst, line] for ok, worst, line in checks]}
            except ConfigError as err:
                res = {"verdict": "refused", "message": str(err)}
            except Exception as err:  # noqa: BLE001 - a crash is the third kind too
                res = {"verdict": "THIRD KIND", "message": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
        res["seconds"] = round(time.perf_counter() - t0, 2)
        out.append(res)
    os.environ.pop(ENV, None)
    return out
