"""AGVM's conformance matrix over DeepSpeed's gradient-path settings (issue 23, item 3).

Every configuration is exact or refused — never silently different. This bench

1. classifies every cell of the full product of :data:`FACTORS` without building an engine:
   *pruned* (DeepSpeed rejects it on this machine, or a switch DeepSpeed ignores at that
   stage makes it a duplicate of another cell — the reason is recorded), *refused* (agvm-ds's
   own pre-engine checks, :mod:`agvm_ds.config.preflight`, raise ``ConfigError``), or
   runnable;
2. runs a covering subset — every pair of factor values that some runnable cell has, at
   least once (a greedy pairwise covering array) plus the rows of issue 23's table — each
   cell through :func:`agvm_ds.selfcheck.run` (its shared-head model, 3 steps, AGVM
   updating on steps 1 and 2, cos/μ against :mod:`agvm_ds.bruteforce` on the gradients
   DeepSpeed holds, those against a plain all-reduce), one ``run_distributed`` launch per world
   size; a cell is *refused* iff ``agvm_ds.initialize`` raises ``ConfigError``, *exact* iff
   every check passes, otherwise it is the **third kind** (mismatch, crash or hang);
3. writes docs/conformance.md (``--out``) with the counts on top and one row per run cell.

    python bench/conformance.py                 # ≈ 6 min on 2 CPU cores (8 covering arrays)
    python bench/conformance.py --max-cells 8   # a quick look

``--fp16-on-cpu`` (default on) lets DeepSpeed's fp16 optimizer run on the CPU accelerator
by answering its ``is_fp16_supported()`` with True inside the ranks (torch does fp16
arithmetic on CPU; only the accelerator's capability probe says no).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FACTORS = {
    "stage": [0, 1, 2, 3],
    "offload": ["none", "optimizer", "param"],
    "overlap_comm": [False, True],
    "contiguous_gradients": [False, True],
    "reduce_scatter": [False, True],
    "round_robin_gradients": [False, True],
    "precision": ["fp32", "bf16", "bf16+fp32acc", "fp16", "autocast-bf16", "autocast-fp16"],
    "estimator": ["micro", "ranks"],
    "gas": [1, 2, 3],
    "world": [1, 2, 3, 4],
    "base": ["SGD", "AdamW", "Lamb"],
}
NAMES = list(FACTORS)
#: switches DeepSpeed reads only at these stages (elsewhere a cell is a duplicate)
APPLIES = {"overlap_comm": (1, 2, 3), "contiguous_gradients": (1, 2, 3), "reduce_scatter": (1, 2, 3),
           "round_robin_gradients": (1, 2)}
OPTIMIZERS = {"SGD": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
              "AdamW": {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.05},
              "Lamb": {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.05}}
#: issue 23's table, one cell per row (the factors not named: the first value)
ISSUE_ROWS = [
    dict(stage=1, overlap_comm=True, estimator="ranks", gas=2, world=2, base="SGD"),
    dict(stage=1, overlap_comm=True, estimator="micro", gas=1, world=2, base="AdamW"),
    dict(stage=2, offload="optimizer", estimator="micro", gas=2, world=2, base="AdamW"),
    dict(stage=1, offload="optimizer", estimator="ranks", gas=2, world=2, base="SGD"),
    dict(stage=3, offload="optimizer", estimator="micro", gas=2, world=2, base="AdamW"),
    dict(stage=2, precision="autocast-fp16", estimator="micro", gas=2, world=2, base="AdamW"),
    dict(stage=1, overlap_comm=True, estimator="micro", gas=2, world=2, base="AdamW"),  # ZeRO-1 overlap, micro
]
#: cells this matrix found neither exact nor refused (kept as regression rows)
FOUND_ROWS = [
    # every AGVM update skipped (μ never moves); ranks, GAS 1, ZeRO-3 or no offload are exact
    dict(stage=2, offload="optimizer", precision="bf16+fp32acc", estimator="micro", gas=2, world=2, base="SGD"),
]


#: cells with a fault: a NaN in one micro-batch of update step 1 (``nan``: step, rank, micro).
#: DeepSpeed and AGVM must skip that step and leave μ where it was (docs/agvm.md)
FAULT_ROWS = [
    dict(stage=1, estimator="micro", gas=2, world=2, base="SGD", nan=(1, 0, 0)),
    dict(stage=3, precision="bf16", estimator="ranks", gas=2, world=2, base="AdamW", nan=(1, 1, 1)),
]


def cell_of(**kw) -> dict:
    """A cell: every factor (the first value where ``kw`` does not name it), plus a fault (``nan``)."""
    cell = {k: kw.get(k, v[0]) for k, v in FACTORS.items()}
    if kw.get("nan") is not None:
        cell["nan"] = tuple(kw["nan"])
    return cell


def key(cell: dict) -> str:
    return " ".join(f"{k}={cell[k]}" for k in NAMES) + (f" nan={cell['nan']}" if cell.get("nan") else "")


def pruned(cell: dict, fp16_on_cpu: bool) -> str | None:
    """Why DeepSpeed rejects this cell here, or which cell it duplicates; None otherwise."""
    s = cell["stage"]
    if cell["offload"] == "param" and s != 3:
        return "offload_param exists only at ZeRO-3"
    if cell["offload"] == "optimizer" and s == 0:
        return "offload_optimizer needs ZeRO >= 1 (DeepSpeed ignores it at stage 0)"
    for opt, stages in APPLIES.items():
        if cell[opt] and s not in stages:
            return f"{opt} has no effect at ZeRO-{s} (same as {opt} false)"
    if cell["precision"] == "fp16" and not fp16_on_cpu:
        return "fp16: the CPU accelerator refuses it (DeepSpeed: 'Type fp16 is not supported on your device')"
    return None


def ds_config(cell: dict) -> dict:
    """The run dict of a cell: tiny buckets so reductions cut tensors (agvm_cases style)."""
    zero = {"stage": cell["stage"], "reduce_bucket_size": 16, "allgather_bucket_size": 16, "sub_group_size": 16,
            "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 64,
            "stage3_prefetch_bucket_size": 16}
    for opt in APPLIES:
        zero[opt] = cell[opt]
    if cell["offload"] in ("optimizer", "param"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if cell["offload"] == "param":
        zero["offload_param"] = {"device": "cpu"}
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": cell["gas"], "gradient_clipping": 0.0,
           "zero_optimization": zero, "zero_force_ds_cpu_optimizer": False,
           "optimizer": {"type": cell["base"], "params": dict(OPTIMIZERS[cell["base"]])},
           "agvm": {"estimator": cell["estimator"]}}
    p = cell["precision"]
    if p.startswith("bf16"):
        cfg["bf16"] = {"enabled": True}
        if p == "bf16+fp32acc":
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    elif p == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    elif p.startswith("autocast"):
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if p.endswith("bf16") else "float16"}
    return cfg


def refused(cell: dict) -> str | None:
    """agvm-ds's pre-engine verdict (what ``agvm_ds.initialize`` checks before DeepSpeed)."""
    from agvm_ds.api import read_agvm_section
    from agvm_ds.config.preflight import preflight
    from agvm_ds.errors import ConfigError
    from agvm_ds.selfcheck import selfcheck_config

    try:
        cfg = selfcheck_config(ds_config(cell), cell["world"])
        agvm = read_agvm_section(cfg, None)
        preflight({k: v for k, v in cfg.items() if k != "agvm"}, agvm, cell["world"])
    except ConfigError as err:
        return str(err)
    return None


def classify(fp16_on_cpu: bool) -> tuple[int, dict, dict, list]:
    """(cells in the full product, pruned reason → count, refusal message → count, runnable cells)."""
    total, prune, refuse, runnable = 0, {}, {}, []
    for values in itertools.product(*FACTORS.values()):
        total += 1
        cell = dict(zip(NAMES, values))
        why = pruned(cell, fp16_on_cpu)
        if why:
            prune[why] = prune.get(why, 0) + 1
            continue
        msg = refused(cell)
        if msg:
            refuse[msg] = refuse.get(msg, 0) + 1
        else:
            runnable.append(cell)
    return total, prune, refuse, runnable


def pairs(cell: dict, names=NAMES) -> set:
    return {((a, cell[a]), (b, cell[b])) for a, b in itertools.combinations(names, 2)}


def covering(pool: list, must: list = (), names=NAMES, seed: int = 0, sample: int = 1500) -> list:
    """Greedy pairwise covering array over ``pool``: start from ``must``, then repeatedly add
    the candidate (best of a random sample of the pool) covering most pairs not yet covered,
    until every pair some pool cell has is covered."""
    rng = random.Random(seed)
    todo = set().union(*(pairs(c, names) for c in pool))
    chosen = list(must)
    for c in chosen:
        todo -= pairs(c, names)
    while todo:
        cands = pool if len(pool) <= sample else rng.sample(pool, sample)
        best = max(cands, key=lambda c: len(pairs(c, names) & todo))
        if not pairs(best, names) & todo:  # the sample missed the rest: take a cell for one pair
            pair = next(iter(todo))
            best = next(c for c in pool if pair <= pairs(c, names))
        chosen.append(best)
        todo -= pairs(best, names)
    return chosen


def run_cells(rank, world, cells, progress, fp16_on_cpu):
    """Rank side: every cell in turn, one engine each; rank 0 appends one JSON line per cell."""
    import traceback

    import deepspeed.runtime.torch_autocast as ds_autocast
    from deepspeed.accelerator import get_accelerator

    from agvm_ds.errors import ConfigError
    from agvm_ds.selfcheck import run, selfcheck_config

    if fp16_on_cpu:
        type(get_accelerator()).is_fp16_supported = lambda self: True
    out = []
    for cell in cells:
        # DeepSpeed's torch_autocast state is process-global and never reset: a fresh
        # process per cell would start without it, so every cell does
        ds_autocast.TORCH_AUTOCAST_INITIALIZED, ds_autocast.TORCH_AUTOCAST_DTYPE = False, None
        t0 = time.perf_counter()
        try:
            nan_at = tuple(cell["nan"]) if cell.get("nan") else None
            checks = run(selfcheck_config(ds_config(cell), world), rank, world, steps=3, nan_at=nan_at)
            res = {"verdict": "exact" if all(ok for ok, *_ in checks) else "THIRD KIND",
                   "checks": [[ok, worst, line] for ok, worst, line in checks]}
        except ConfigError as err:
            res = {"verdict": "refused", "message": str(err)}
        except Exception as err:  # noqa: BLE001 - recorded as the third kind
            res = {"verdict": "THIRD KIND", "message": f"{type(err).__name__}: {err}".splitlines()[0][:300],
                   "trace": traceback.format_exc()[-1500:]}
        res.update(cell=cell, seconds=round(time.perf_counter() - t0, 2))
        if rank == 0:
            with open(progress, "a") as f:
                f.write(json.dumps(res) + "\n")
        out.append(res)
    return out


def run_world(world, cells, progress: Path, fp16_on_cpu: bool, timeout: float) -> list:
    """All cells of one world size; a launch that dies or hangs marks its current cell as the
    third kind and the rest run in a fresh launch."""
    from agvm_ds.testing.distributed import RankError, run_distributed

    done: list = []
    while cells:
        progress.write_text("")
        try:
            done += run_distributed(run_cells, world, cells, str(progress), fp16_on_cpu, timeout=timeout)[0]
            break
        except RankError as err:
            got = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
            done += got
            bad = cells[len(got)]
            done.append({"verdict": "THIRD KIND", "cell": bad, "seconds": None,
                         "message": "launch died or hung: " + str(err).strip().splitlines()[-1][:300]})
            cells = cells[len(got) + 1:]
    return done


def fmt_cell(c: dict) -> str:
    off = {"none": "-", "optimizer": "opt", "param": "opt+param"}[c["offload"]]
    sw = "".join(ch if c[k] else "." for k, ch in zip(APPLIES, "ocsr"))
    prec = c["precision"] + (f", NaN at (step, rank, micro) {tuple(c['nan'])}" if c.get("nan") else "")
    return f"| {c['stage']} | {off} | {sw} | {prec} | {c['estimator']} | {c['gas']} | {c['world']} | {c['base']} |"


def write_doc(path: Path, total, prune, refuse, runnable, results, seconds, classify_s, fp16_on_cpu, arrays):
    import deepspeed
    import torch

    from agvm_ds.zero.support import markdown

    n_pruned, n_refused = sum(prune.values()), sum(refuse.values())
    verdicts = {v: sum(r["verdict"] == v for r in results) for v in ("exact", "refused", "THIRD KIND")}
    ex = [r for r in results if r["verdict"] == "exact"]
    w = [max((r["checks"][k][1] for r in ex), default=float("nan")) for k in range(3)]
    L = ["# AGVM conformance matrix (issue 23)", "",
         "Generated by `python bench/conformance.py` — do not edit by hand. Every configuration is",
         "**exact** (AGVM's cos and μ equal a float64 brute force, DeepSpeed's averaged gradient equals a",
         "plain all-reduce) or **refused** before DeepSpeed builds an engine; anything else is the",
         "*third kind* and must be fixed or refused.", "",
         f"* DeepSpeed {deepspeed.__version__}, torch {torch.__version__}, CPU accelerator, gloo ranks "
         "(one process per rank, all on a 2-core machine).",
         f"* Full product of the factors: **{total} cells**, all classified (in {classify_s:.0f} s, no engine):",
         f"  * pruned: **{n_pruned}** (DeepSpeed rejects them here, or a switch DeepSpeed ignores at that stage "
         "makes the cell a duplicate of one with the switch off):"]
    L += [f"    * {n} — {why}" for why, n in sorted(prune.items(), key=lambda kv: -kv[1])]
    L += [f"  * refused by agvm-ds before the engine: **{n_refused}**:"]
    L += [f"    * {n} — `{msg}`" for msg, n in sorted(refuse.items(), key=lambda kv: -kv[1])]
    L += [f"  * runnable: **{len(runnable)}**.",
          f"* **Only a covering subset was run**: {len(results)} cells — {arrays} greedy pairwise covering arrays "
          f"(seeds 0..{arrays - 1}: every pair of factor values that some runnable cell has, at least once in each), "
          "plus one cell per row of "
          "issue 23's table and the cells this matrix found (`ISSUE_ROWS`, `FOUND_ROWS`; run even where they "
          "are refused, to show `agvm_ds.initialize` refusing them).",
          f"* Result: **{verdicts['exact']} exact, {verdicts['refused']} refused at initialize, "
          f"{verdicts['THIRD KIND']} third kind**; run time {seconds / 60:.1f} min.",
          f"* Worst errors over the exact cells: the gradients DeepSpeed holds (its averaged gradient, and the "
          f"second vector AGVM's split reads) vs a float64 all-reduce of the hook-recorded gradients {w[0]:.1e} "
          f"(relative, norm per module; tolerance 1e-5 where all sums are fp32, DeepSpeed's rounding bound in "
          f"bf16/fp16), AGVM cos {w[1]:.1e} and μ {w[2]:.1e} (relative, against a float64 computation on the "
          f"gradients DeepSpeed holds; tolerance 1e-5 in every precision, Adam-preconditioned too).",
          "* fp16 (DeepSpeed's `fp16` section with loss scaling): " + (
              "the CPU accelerator's `is_fp16_supported()` is patched to True inside the ranks, so DeepSpeed's "
              "fp16 optimizers really run on CPU here (a real test of the loss-scaling path)." if fp16_on_cpu else
              "pruned here: needs a GPU — run `agvm_ds.selfcheck` there."),
          ]
    third = [r for r in results if r["verdict"] == "THIRD KIND"]
    if third:
        L += ["", f"## THIRD KIND: {len(third)} cell(s) neither exact nor refused — fix or refuse", ""]
        L += [f"* `{key(r['cell'])}`: " + (r.get("message") or "; ".join(c[2] for c in r["checks"] if not c[0]))
              for r in third]
    L += ["", "## The cells run", "", "Each cell: `agvm_ds.selfcheck.run` on its shared-head model (a head applied to three levels), "
          "micro-batch 4, 3 steps, AGVM updating on steps 1 and 2, ZeRO buckets of 16 elements. Columns: "
          "switches `ocsr` = overlap_comm, contiguous_gradients, reduce_scatter, round_robin_gradients "
          "(letter: on, `.`: off); errors = grad / cos / μ.", "",
          "| stage | offload | ocsr | precision | estimator | GAS | world | base | verdict | errors or message | s |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["verdict"] == "exact" or r.get("checks"):
            detail = " / ".join(f"{c[1]:.1e}" for c in r["checks"])
            if r["verdict"] != "exact":
                detail += "; " + "; ".join(c[2] for c in r["checks"] if not c[0])
        else:
            detail = f"`{r.get('message', '')}`"
        L.append(f"{fmt_cell(r['cell'])} {r['verdict']} | {detail} | {r['seconds']} |")
    L += ["", "## The support table (agvm_ds/zero/support.py)", "", markdown(), ""]
    path.write_text("\n".join(L))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "docs" / "conformance.md"))
    p.add_argument("--arrays", type=int, default=8, help="pairwise covering arrays to run (seeds 0..N-1)")
    p.add_argument("--max-cells", type=int, default=0, help="run only the first N cells of the subset")
    p.add_argument("--no-fp16-on-cpu", dest="fp16_on_cpu", action="store_false")
    p.add_argument("--timeout", type=float, default=300, help="seconds per launch before it counts as hung")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    total, prune, refuse, runnable = classify(args.fp16_on_cpu)
    classify_s = time.perf_counter() - t0
    must = [cell_of(**row) for row in ISSUE_ROWS + FOUND_ROWS + FAULT_ROWS]
    subset, seen = [], set()
    for seed in range(args.arrays):  # independent covering arrays: every pair about ``arrays`` times
        for c in covering(runnable, must if seed == 0 else (), seed=seed):
            if key(c) not in seen:
                seen.add(key(c))
                subset.append(c)
    if args.max_cells:
        subset = subset[:args.max_cells]
    print(f"{total} cells: {sum(prune.values())} pruned, {sum(refuse.values())} refused, {len(runnable)} runnable; "
          f"running {len(subset)} ({classify_s:.0f} s to classify)", flush=True)
    results = []
    t1 = time.perf_counter()
    progress = Path(args.out).with_suffix(".progress.jsonl")
    for world in sorted({c["world"] for c in subset}):
        # autocast cells last: DeepSpeed's autocast state is process-global (reset per cell too)
        cells = sorted((c for c in subset if c["world"] == world), key=lambda c: c["precision"].startswith("autocast"))
        tw = time.perf_counter()
        got = run_world(world, cells, progress, args.fp16_on_cpu, args.timeout)
        results += got
        bad = [r for r in got if r["verdict"] == "THIRD KIND"]
        print(f"world {world}: {len(got)} cells in {time.perf_counter() - tw:.0f} s, {len(bad)} third kind", flush=True)
        for r in bad:
            print(f"  THIRD KIND {key(r['cell'])}: {r.get('message') or [c[2] for c in r['checks'] if not c[0]]}",
                  flush=True)
    progress.unlink(missing_ok=True)
    write_doc(Path(args.out), total, prune, refuse, runnable, results, time.perf_counter() - t1, classify_s,
              args.fp16_on_cpu, args.arrays)
    n_bad = sum(r["verdict"] == "THIRD KIND" for r in results)
    print(f"wrote {args.out}: {len(results)} run, {n_bad} third kind", flush=True)
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
