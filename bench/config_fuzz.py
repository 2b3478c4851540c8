"""A single-key fuzz of DeepSpeed's config (issue 30, item 6): every key the installed DeepSpeed
reads (:func:`agvm_ds.zero.schema.discover`), one non-default value at a time, on a small
valid run. The outcome of each must be *accepted* or *refused in one line* — never a
traceback, never a third kind.

1. **preflight** (in-process, ~1 s for all keys): :func:`agvm_ds.config.preflight.preflight`
   accepts the value or raises one :class:`ConfigError` line; ``tests/test_schema.py`` runs
   this part in CI.
2. **run** (``--run``, 2 gloo ranks, one launch): every *accepted* value that is not inert
   goes through ``agvm_ds.initialize`` and :func:`agvm_ds.selfcheck.run` (AGVM's cos and μ
   against the float64 brute force, DeepSpeed's reduction against a plain all-reduce):
   exact, or refused by ``initialize`` (one line), or the third kind (mismatch or crash).

    python bench/config_fuzz.py            # preflight part, prints the counts
    python bench/config_fuzz.py --run      # + the accepted factor keys through the self-check
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASE = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
        "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 16, "allgather_bucket_size": 16},
        "gradient_clipping": 0.0}
WORLD = 2
#: hand-picked non-default values where the type alone does not say one
VALUES = {
    "communication_data_type": "fp16", "seq_parallel_communication_data_type": "fp32",
    "gradient_allreduce_op": "sum", "gradient_predivide_factor": 2.0, "log_level": "info",
    "zero_optimization.stage": 3, "zero_optimization.offload_optimizer.device": "cpu",
    "zero_optimization.offload_param.device": "cpu", "torch_autocast.dtype": "bfloat16",
    "data_types.grad_accum_dtype": "fp32", "data_types.param_dtype": "bf16", "data_types.buffer_dtype": "bf16",
    "data_types.keep_in_fp32_modules": ["norm"], "torch_autocast.lower_precision_safe_modules": ["torch.nn.Linear"],
    "zero_optimization.offload_optimizer.nvme_path": "/tmp/agvm_fuzz_nvme",
    "zero_optimization.offload_param.nvme_path": "/tmp/agvm_fuzz_nvme",
    "train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4,
}


def _model_field(path: str):
    """The pydantic field DeepSpeed validates ``path`` with, or None."""
    from pydantic import BaseModel

    from agvm_ds.zero.schema import SECTION_MODELS, load_model

    parts = path.split(".")
    for cut in (2, 1):
        section = ".".join(parts[:cut])
        if section in SECTION_MODELS and len(parts) > cut:
            model, rest = load_model(SECTION_MODELS[section]), parts[cut:]
            for i, part in enumerate(rest):
                field = model.model_fields.get(part) or next(
                    (f for f in model.model_fields.values() if f.alias == part), None)
                if field is None:
                    return None
                if i == len(rest) - 1:
                    return field
                nested = [a for a in (field.annotation, *typing.get_args(field.annotation))
                          if isinstance(a, type) and issubclass(a, BaseModel)]
                if not nested:
                    return None
                model = nested[0]
    return None


def non_default(path: str):
    """One value of ``path`` other than DeepSpeed's default."""
    if path in VALUES:
        return VALUES[path]
    field = _model_field(path)
    default = field.default if field is not None and not field.is_required() else None
    annotation = field.annotation if field is not None else None
    args = typing.get_args(annotation) if annotation is not None else ()
    if isinstance(default, bool) or annotation is bool or bool in args:
        return not bool(default)
    if isinstance(default, int) and not isinstance(default, bool):
        return default + 2 if default < 10 else default // 2
    if isinstance(default, float):
        return default / 2 if default else 0.5
    if isinstance(default, str):
        enum = next((a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, __import__("enum").Enum)), None)
        if enum is not None:
            return next(m.value for m in enum if m.value != default)
        return default + "_x"
    if int in args:
        return 2
    if field is not None and default is None:
        return {}
    return {"enabled": True} if "." not in path else True


def with_key(path: str, value) -> dict:
    cfg = copy.deepcopy(BASE)
    node = cfg
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return cfg


def cases() -> list[tuple[str, object, dict]]:
    from agvm_ds.zero.schema import REMOVED, classification, discover

    out = []
    for path in sorted(discover()):
        row = classification(path)
        if row is None or row.kind == REMOVED and "." in path:
            continue
        value = True if row.kind == REMOVED else non_default(path)
        out.append((path, value, with_key(path, value)))
    return out


def preflight_outcome(path: str, cfg: dict) -> tuple[str, str]:
    """(``accepted`` | ``refused`` | ``third``, the message) of the preflight on ``cfg``."""
    from agvm_ds.config.agvm import AGVMConfig
    from agvm_ds.config.preflight import preflight
    from agvm_ds.zero.settings import resolve_batch
    from agvm_ds.errors import ConfigError

    try:  # what the config check and initialize do: the batch keys at this world size, then the preflight
        cfg = copy.deepcopy(cfg)
        resolve_batch(cfg, WORLD)
        preflight(cfg, AGVMConfig(), WORLD)
    except ConfigError as err:
        msg = str(err)
        return ("refused" if "\n" not in msg else "third"), msg
    except Exception as err:  # noqa: BLE001 - the third kind is what this bench looks for
        return "third", f"{type(err).__name__}: {err}"
    return "accepted", ""


def run_preflight() -> list[dict]:
    from agvm_ds.zero.schema import classification

    rows = []
    for path, value, cfg in cases():
        verdict, msg = preflight_outcome(path, cfg)
        rows.append({"key": path, "value": value, "kind": classification(path).kind, "verdict": verdict,
                     "message": msg, "names_key": path in msg or path.split(".")[0] in msg})
    return rows


def run_cells(rank: int, world: int, rows: list[dict], progress: str) -> list[dict]:
    """Inside each rank: the self-check of every accepted non-inert key's config."""
    from deepspeed.accelerator import get_accelerator

    from agvm_ds.errors import ConfigError
    from agvm_ds.selfcheck import run, selfcheck_config

    # DeepSpeed's fp16 optimizers on the CPU accelerator (bench/conformance.py does the same:
    # torch does fp16 arithmetic on CPU, only the accelerator's capability probe says no)
    type(get_accelerator()).is_fp16_supported = lambda self: True

    out = []
    for row in rows:
        t0 = time.perf_counter()
        cfg = with_key(row["key"], row["value"])
        try:
            checks = run(selfcheck_config(cfg, world), rank, world, steps=3)
            verdict = "exact" if all(ok for ok, *_ in checks) else "THIRD KIND"
            res = {"checks": [(ok, err, line) for ok, err, line in checks]}
        except ConfigError as err:
            verdict, res = "refused", {"message": str(err)}
        except Exception as err:  # noqa: BLE001
            verdict, res = "THIRD KIND", {"message": f"{type(err).__name__}: {err}"}
        out.append({**row, "run": verdict, **res, "seconds": round(time.perf_counter() - t0, 1)})
        if rank == 0:
            with open(progress, "a") as f:
                f.write(json.dumps({"key": row["key"], "run": verdict}) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="store_true", help="run the accepted non-inert keys through the self-check")
    p.add_argument("--json", default=None, help="write every row here")
    p.add_argument("--out", default=None, help="rewrite the schema block of this Markdown file (docs/conformance.md)")
    args = p.parse_args(argv)
    rows = run_preflight()
    counts = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    print(f"preflight over {len(rows)} keys: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for r in rows:
        if r["verdict"] == "third" or (r["verdict"] == "refused" and not r["names_key"]):
            print(f"  {r['verdict']}: {r['key']}={r['value']!r}: {r['message']}")
    if args.run:
        from agvm_ds.testing.distributed import run_distributed

        todo = [r for r in rows if r["verdict"] == "accepted" and r["kind"] in ("factor", "agvm")]
        results = run_distributed(run_cells, WORLD, todo, "/tmp/agvm_config_fuzz.jsonl", timeout=1200)[0]
        ran = {}
        for r in results:
            ran[r["run"]] = ran.get(r["run"], 0) + 1
            if r["run"] != "exact":
                print(f"  run {r['run']}: {r['key']}={r['value']!r}: {r.get('message') or [c[2] for c in r['checks'] if not c[0]]}")
        print(f"self-check over the {len(todo)} accepted non-inert keys: " +
              ", ".join(f"{k} {v}" for k, v in sorted(ran.items())))
        rows = [next((x for x in results if x["key"] == r["key"]), r) for r in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    if args.out:
        write_block(Path(args.out), markdown(rows, " ".join(["python bench/config_fuzz.py"] + (argv or sys.argv[1:]))))
        print(f"wrote {args.out}")
    return 0


BEGIN, END = "<!-- schema:begin -->", "<!-- schema:end -->"


def markdown(rows: list[dict], command: str) -> str:
    """The schema block: counts per class, the fuzz's counts, one row per key."""
    from agvm_ds.zero.schema import classification

    kinds, verdicts, runs = {}, {}, {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
        if "run" in r:
            runs[r["run"]] = runs.get(r["run"], 0) + 1
    fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items()))  # noqa: E731
    lines = [BEGIN, "## Every DeepSpeed key (agvm_ds/zero/schema.py) and the single-key fuzz", "",
             f"Made by `{command}` on DeepSpeed {_ds_version()}. Every key the installed DeepSpeed reads, "
             "one non-default value each on a small valid run (ZeRO-2, GAS 2, 2 ranks); the preflight "
             "accepts it or refuses it in one line — a third kind (traceback, multi-line) fails "
             "tests/test_schema.py.", "",
             f"* keys by class: {fmt(kinds)} ({len(rows)} keys)",
             f"* preflight verdicts: {fmt(verdicts)}"]
    if runs:
        lines.append(f"* accepted non-inert keys through `agvm_ds.initialize` + the self-check (float64 brute "
                     f"force, 2 gloo ranks): {fmt(runs)}")
    lines += ["", "| key | class | why | fuzz value | preflight | self-check |", "|---|---|---|---|---|---|"]
    for r in rows:
        why = classification(r["key"]).why.replace("|", "/")
        lines.append(f"| `{r['key']}` | {r['kind']} | {why} | `{json.dumps(r['value'], default=str)}` | "
                     f"{r['verdict']} | {r.get('run', '')} |")
    return "\n".join(lines + ["", END])


def _ds_version() -> str:
    from importlib import metadata

    return metadata.version("deepspeed")


def write_block(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
