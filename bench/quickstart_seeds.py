#!/usr/bin/env python
"""The quickstart's AP over training seeds: the range a new machine should expect.

    .venv/bin/python bench/quickstart_seeds.py [--seeds 0 1 2] [--ranks 2] [--out docs/benchmarks.md]

Runs ``make train``'s command (``deepspeed --num_gpus R launch/train.py --deepspeed_config
ds_configs/quickstart.json``) once per seed with ``--override train.seed=S`` (weights, data
order, augmentation; the benchmark itself is the same), each into ``runs/quickstart_seeds/
seed<S>/``, and writes one table of (seed, bbox_AP, bbox_AP50, training time, wall time)
into the ``## Quickstart AP over seeds`` section of ``--out`` (replaced when present), with
the command and the commit each run ran on. A seed whose ``result.json`` exists is reused
(delete its folder to measure it again).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Quickstart AP over seeds (`bench/quickstart_seeds.py`)"


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip() or "unknown"


def run_seed(seed: int, ranks: int, out: Path) -> dict:
    done = out / "result.json"
    if done.is_file():  # measured before (its row names the commit it ran on)
        return json.loads(done.read_text())
    bindir = Path(sys.executable).parent
    cmd = [str(bindir / "deepspeed"), "--num_gpus", str(ranks), "launch/train.py", "--deepspeed_config",
           "ds_configs/quickstart.json", "--output_dir", str(out), "--override", f"train.seed={seed}"]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(out / "console.txt", "w") as console:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT)
    wall = time.time() - start
    if rc != 0:
        raise SystemExit(f"error: seed {seed}: exit {rc}, see {out / 'console.txt'}")
    stats = json.loads((out / "eval.json").read_text())
    text = (out / "console.txt").read_text()
    m = re.search(r"done: \d+ steps.* in ([\d.]+) s of training", text)
    result = {"seed": seed, "bbox_AP": stats["bbox_AP"], "bbox_AP50": stats["bbox_AP50"],
              "train_s": float(m.group(1)) if m else None, "wall_s": round(wall, 1), "commit": _commit()}
    done.write_text(json.dumps(result))
    return result


def section(results: list[dict], cmd: str) -> str:
    aps = [r["bbox_AP"] for r in results]
    rows = "\n".join(f"| {r['seed']} | {r['bbox_AP']:.4f} | {r['bbox_AP50']:.4f} | "
                     f"{r['train_s'] if r['train_s'] is not None else '?'} | {r['wall_s']} | {r['commit']} |"
                     for r in results)
    return (f"{SECTION}\n\nCommand: `{cmd}` ("
            f"{time.strftime('%Y-%m-%d')}). Each row is the quickstart with `--override train.seed=S`, "
            f"through the deepspeed launcher, outside `make` (no install time); the wall time includes "
            f"start-up and the final evaluation, and depends on what else the machine ran.\n\n"
            f"| train.seed | bbox_AP | bbox_AP50 | training (s) | wall (s) | commit |\n|---|---|---|---|---|---|\n{rows}\n\n"
            f"bbox_AP over seeds: min {min(aps):.4f}, max {max(aps):.4f}.\n")


def write_section(path: Path, text: str) -> None:
    doc = path.read_text() if path.is_file() else ""
    if SECTION in doc:
        head, _, rest = doc.partition(SECTION)
        nxt = rest.find("\n## ")
        doc = head + text + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, args.ranks, REPO / "runs" / "quickstart_seeds" / f"seed{seed}"))
        print(json.dumps(results[-1]), flush=True)
    cmd = "python bench/quickstart_seeds.py --seeds " + " ".join(map(str, args.seeds)) + \
        ("" if args.ranks == 2 else f" --ranks {args.ranks}")
    write_section(args.out, section(results, cmd))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
