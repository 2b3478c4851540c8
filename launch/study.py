"""The large-batch study: a grid of real ``launch/train.py`` runs, and the report of what came out.

One command trains every cell of the grid through the product itself (the DeepSpeed
launcher, the engines, AGVM) and writes ``docs/large_batch.md``::

    python launch/study.py                   # the default grid, ~1.5 h on the 2-core machine
    python launch/study.py --full            # more seeds, 64x, for a GPU machine
    python launch/study.py --cells sgd-agvm-b16-s0 --set train.epochs=0.05   # one cell
    python launch/study.py --grid pretrained --dry-run   # issue 33's grid: launch/study_pretrained.py

Grid: optimizer {SGD, AdamW} x {plain, AGVM} x batch {1x, 8x, 32x} of a base batch of 16,
seeds per batch from :data:`SEEDS` (>= 2 at the largest). Every cell starts from
``ds_configs/study_shapes64.json`` and changes only: the optimizer, AGVM on/off, the batch
layout (micro batch x gradient accumulation on one rank), the seed, and the lr (the paper's
rule through ``train.lr_scaling``: linear up to 128 images, square root above). Epochs
and the warmup in epochs are the same at every batch, so a larger batch gets fewer steps.

"Plain" cells run AGVM with its clamp at [1, 1]: μ is pinned to 1, so every learning rate
is the base optimizer's own (lr x 1.0 is exact), while Φ and B_noise are still measured.
That is what Fig. 1 of the paper plots: the misalignment of plain training.

Each cell is its own output dir under ``--out``; a cell whose ``study_cell.json`` records
the same config fingerprint is reused, so the grid can be stopped, resumed and extended.
Cells run ``--jobs`` at a time (one rank and ``cores / jobs`` threads each).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASE_CONFIG = REPO / "ds_configs" / "study_shapes64.json"
BASE_BATCH = 16

#: optimizer name -> (DeepSpeed optimizer block without lr, lr at BASE_BATCH images)
OPTIMIZERS = {
    # the paper's SGD recipe: 0.02 per 16 images, momentum 0.9, weight decay 1e-4
    "sgd": ({"type": "SGD", "params": {"momentum": 0.9, "weight_decay": 1e-4}}, 0.02),
    # half the quickstart's 2e-3 at batch 16: the rule's linear part makes it 8e-3 at 128
    # (the one-seed probe trained at 8e-3 at batch 256) and 1.6e-2 at 512
    "adamw": ({"type": "AdamW", "params": {"betas": [0.9, 0.999], "weight_decay": 0.05}}, 1e-3),
    # --full only, and untuned starting points (never run on the 2-core machine): the
    # layer-wise baselines of the paper's tables, exact under ZeRO in agvm_ds.optim
    "lamb": ({"type": "Lamb", "params": {"betas": [0.9, 0.999], "weight_decay": 0.05}}, 1e-3),
    # step ~ lr * trust_coeff * |w| per tensor: lr 1 per 16 images moves 0.1 % of |w|
    "lars": ({"type": "Lars", "params": {"momentum": 0.9, "weight_decay": 1e-4,
                                         "trust_coeff": 0.001}}, 1.0),
}
DEFAULT_OPTIMIZERS = ("sgd", "adamw")
SQRT_ABOVE = 128          # the paper's rule: linear lr up to 128 images, square root above
MULTIPLIERS = (1, 8, 32)  # of BASE_BATCH
SEEDS = {1: (0,), 8: (0,), 32: (0, 1)}
FULL_MULTIPLIERS = (1, 8, 32, 64)
FULL_SEEDS = {1: (0, 1), 8: (0, 1, 2), 32: (0, 1, 2), 64: (0, 1, 2)}
LARGE_MICRO = 32          # micro batch of every cell above 1x (gradient accumulation does the rest)
CLIP_WARMUPS = 2          # global-norm clipping (1.0) over the first 2 warmups' worth of steps


@dataclass(frozen=True)
class Cell:
    optimizer: str
    agvm: bool
    multiplier: int
    seed: int

    @property
    def batch(self) -> int:
        return BASE_BATCH * self.multiplier

    @property
    def name(self) -> str:
        return f"{self.optimizer}-{'agvm' if self.agvm else 'plain'}-b{self.batch}-s{self.seed}"

    def layout(self) -> tuple[int, int]:
        """(micro batch, gradient accumulation steps) on one rank; >= 2 micro-batches each, as
        AGVM's micro estimator needs two gradient halves."""
        if self.multiplier == 1:
            return BASE_BATCH // 2, 2
        return LARGE_MICRO, self.batch // LARGE_MICRO


def grid(full: bool = False) -> list[Cell]:
    """Cells in run order: longest (smallest batch, slowest per image) first, so that
    ``--jobs`` parallel slots finish close together."""
    mults, seeds = (FULL_MULTIPLIERS, FULL_SEEDS) if full else (MULTIPLIERS, SEEDS)
    optimizers = tuple(OPTIMIZERS) if full else DEFAULT_OPTIMIZERS
    return [Cell(opt, agvm, m, s) for m in mults for s in seeds[m]
            for opt in optimizers for agvm in (False, True)]


def pick_cells(default: list, names: list | None, known: list) -> list | None:
    """``--cells``: the named cells (any of ``known``) in the order given, else ``default``;
    None after the one-line error when a name is unknown."""
    if not names:
        return default
    by_name = {c.name: c for c in known}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        print(f"error: --cells: unknown cell(s) {', '.join(unknown)}; names look like "
              f"{default[0].name}", file=sys.stderr)
        return None
    return [by_name[n] for n in names]


def check_destinations(out: Path, doc: Path) -> str | None:
    """The one-line refusal when a study would write over something it should not: ``--doc``
    is rewritten in place (its generated block replaced, or one appended), so it must be a
    Markdown file (a run file, weights or any other input named there would be corrupted);
    ``--out`` holds one folder per cell, so it must not be a file. None when both are fine."""
    if Path(doc).suffix.lower() != ".md" or Path(doc).is_dir():
        return (f"error: --doc {doc}: the report is written into a Markdown file (.md), which keeps "
                f"everything outside its generated block; name one")
    if Path(out).exists() and not Path(out).is_dir():
        return f"error: --out {out}: is a file, not a folder (one folder per cell goes there)"
    return None


def set_key(cfg: dict, dotted: str, value) -> None:
    node = cfg
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def parse_assignment(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"error: --set expects KEY.PATH=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def cell_config(cell: Cell, base: dict, assignments: list[tuple[str, object]]) -> dict:
    """The run file of one cell: the base study config with this cell's choices."""
    cfg = copy.deepcopy(base)
    cfg.pop("_comment", None)
    cfg.pop("train_batch_size", None)  # the base file's 16 pins one rank; the layout below decides
    block, base_lr = OPTIMIZERS[cell.optimizer]
    cfg["optimizer"] = copy.deepcopy(block)
    cfg["optimizer"]["params"]["lr"] = base_lr
    micro, gas = cell.layout()
    cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = micro, gas
    train = cfg.setdefault("train", {})
    train["seed"] = cell.seed
    train["lr_scaling"] = {"base_lr": base_lr, "base_batch": BASE_BATCH, "sqrt_above": SQRT_ABOVE}
    agvm = cfg.setdefault("agvm", {})
    agvm["enabled"] = True
    agvm["estimator"] = "micro"
    if not cell.agvm:
        agvm["clamp"] = [1.0, 1.0]  # μ ≡ 1: the base optimizer, with Φ and B_noise measured
    for key, value in assignments:
        set_key(cfg, key, value)
    steps, warmup = schedule_steps(cfg, cell.batch)
    if warmup > 0:
        train["grad_clip"] = {"max_norm": 1.0, "start_step": 0, "end_step": CLIP_WARMUPS * warmup}
    return cfg


def schedule_steps(cfg: dict, batch: int) -> tuple[int, int]:
    """(total, warmup) optimizer steps, as the launcher converts epochs (ceil of images / batch)."""
    train = cfg["train"]
    images = cfg["data"]["synthetic"]["train"]
    total = train.get("max_steps") or math.ceil(train["epochs"] * images / batch)
    if train.get("warmup_steps") is not None:
        warmup = train["warmup_steps"]
    else:
        warmup = math.ceil(train.get("warmup_epochs", 0) * images / batch)
    return total, min(warmup, total)


def fingerprint(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def cell_done(cell_dir: Path, digest: str) -> dict | None:
    try:
        record = json.loads((cell_dir / "study_cell.json").read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("fingerprint") == digest and record.get("rc") == 0 else None


def run_cell(cell: Cell, cfg: dict, out: Path, port: int, threads: int, log) -> dict:
    """Train one cell through the DeepSpeed launcher; returns its ``study_cell.json`` record."""
    cell_dir = out / cell.name
    digest = fingerprint(cfg)
    record = cell_done(cell_dir, digest)
    if record is not None:
        log(f"{cell.name}: reused ({record['wall_s']:.0f} s when it ran)")
        return record
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "study_cell.json").unlink(missing_ok=True)
    # the training run gets a folder of its own (the launcher keeps one run per folder, and
    # refuses a folder holding other files); an unfinished earlier attempt is started afresh
    from launch.study_report import RUN_SUBDIR

    run_dir = cell_dir / RUN_SUBDIR
    shutil.rmtree(run_dir, ignore_errors=True)
    config_path = cell_dir / "run_config.json"
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_gpus", "1",
           "--master_port", str(port), str(REPO / "launch" / "train.py"),
           "--deepspeed_config", str(config_path), "--output_dir", str(run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    steps, warmup = schedule_steps(cfg, cell.batch)
    log(f"{cell.name}: start ({steps} steps, warmup {warmup}, "
        f"batch {cell.batch} = {cfg['train_micro_batch_size_per_gpu']} x "
        f"{cfg['gradient_accumulation_steps']})")
    start = time.perf_counter()
    with open(cell_dir / "study_console.txt", "w") as console:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    record = {"cell": cell.name, "optimizer": cell.optimizer, "agvm": cell.agvm,
              "batch": cell.batch, "multiplier": cell.multiplier, "seed": cell.seed,
              "steps": steps, "warmup_steps": warmup, "wall_s": round(wall, 1), "rc": rc,
              "fingerprint": digest}
    (cell_dir / "study_cell.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"{cell.name}: {'done' if rc == 0 else f'FAILED (exit {rc}), see {cell_dir}/study_console.txt'}"
        f" in {wall:.0f} s")
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="one dir per cell (default runs/study, runs/study_pretrained[_full])")
    p.add_argument("--doc", type=Path, default=None,
                   help="report to (re)write, its generated block only (default "
                        "docs/large_batch.md, docs/large_batch_pretrained[_full].md)")
    p.add_argument("--full", action="store_true",
                   help="the GPU grid: 64x, more seeds, LAMB and LARS (untuned lr)")
    p.add_argument("--cells", nargs="*", default=None, metavar="NAME",
                   help="run only these cells (names as sgd-agvm-b512-s0); default all")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                   help="change one value of every cell's run file (JSON value), e.g. "
                        "train.epochs=20; changed cells are trained again")
    p.add_argument("--jobs", type=int, default=2, help="cells trained at once (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per cell (default: cores // jobs)")
    p.add_argument("--port", type=int, default=29710, help="first master port (one per job)")
    p.add_argument("--no-run", action="store_true", help="only rebuild the report from --out")
    p.add_argument("--grid", choices=("default", "pretrained"), default="default",
                   help="default: the study of docs/large_batch.md (random init); pretrained: "
                        "issue 33's paper conditions (launch/study_pretrained.py)")
    p.add_argument("--select", action="store_true",
                   help="pretrained grid: choose AGVM's tau/alpha on the held-out draw first")
    p.add_argument("--dry-run", action="store_true",
                   help="pretrained grid: list the cells, validate their run files, print the "
                        "CPU-time estimate; train nothing")
    p.add_argument("--backbone_checkpoint", type=Path, default=None,
                   help="pretrained grid: backbone weights (default: "
                        "models/pretrained/uninet_tiny_shapes.safetensors)")
    p.add_argument("--backbone_norm", choices=("frozen_bn", "bn"), default="frozen_bn",
                   help="pretrained grid: what the backbone's BatchNorms do")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)  # shown atop the doc
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pretrained = args.grid == "pretrained"
    # the pretrained --full grid (a GPU) has cells of the CPU grid's names (b128 is 32x there,
    # 8x in --full) and its own results: its own folder and report, never the CPU grid's
    stem = ("study_pretrained" + ("_full" if args.full else "")) if pretrained else "study"
    args.out = args.out or REPO / "runs" / stem
    args.doc = args.doc or REPO / "docs" / (f"large_batch_pretrained{'_full' if args.full else ''}.md"
                                            if pretrained else "large_batch.md")
    refusal = check_destinations(args.out, args.doc)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    if pretrained:
        from launch.study_pretrained_run import main as pretrained_main

        return pretrained_main(args, argv)
    if args.select or args.dry_run:
        print("error: --select and --dry-run belong to --grid pretrained", file=sys.stderr)
        return 2
    from launch.study_report import write_report

    cells = pick_cells(grid(args.full), args.cells, grid(True) + grid(False))
    if cells is None:
        return 2
    if args.jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return 2
    assignments = [parse_assignment(a) for a in args.assignments]
    from agvm_ds.config.inherit import read_run_file

    base = read_run_file(BASE_CONFIG)  # in full: the cells' files are written elsewhere, where a _base_ would not resolve
    configs = {c: cell_config(c, base, assignments) for c in cells}
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)

    def log(msg: str) -> None:
        print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if not args.no_run:
        run_cells(configs, args.out, args.jobs, args.port, threads, log)
    command = args.command or "python launch/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = write_report(args.out, args.doc, cells, command=command.strip())
    log(f"report: {doc}")
    return 0


def run_cells(configs: dict, out: Path, jobs: int, port: int, threads: int, log) -> list[dict]:
    """Train ``configs`` ({cell: run file}, in order) ``jobs`` at a time; the records."""
    seen = set()
    for cfg in configs.values():  # each distinct benchmark once, before the cells start
        key = json.dumps(cfg["data"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            prepare_data(cfg, log)
    free_ports = list(range(port, port + jobs))

    def work(cell) -> dict:
        slot = free_ports.pop()
        try:
            return run_cell(cell, configs[cell], out, slot, threads, log)
        finally:
            free_ports.append(slot)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        records = list(pool.map(work, configs))
    failed = [r["cell"] for r in records if r["rc"] != 0]
    if failed:
        log(f"{len(failed)} cell(s) failed: {', '.join(failed)}")
    return records


def prepare_data(cfg: dict, log) -> None:
    """Generate the benchmark once, before the cells start (they would otherwise queue on
    its lock one after another)."""
    from agvm_ds.config.data import DataConfig
    from agvm_ds.data.build import dataset_root

    start = time.perf_counter()
    root = dataset_root(DataConfig(**cfg["data"]))
    log(f"benchmark ready in {root} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
