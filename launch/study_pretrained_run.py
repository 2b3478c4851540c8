"""``launch/study.py --grid pretrained``: dry run, held-out selection, the grid, the report.

The cells and their run files are :mod:`launch.study_pretrained`'s; training goes through
:func:`launch.study.run_cells` (the default grid's runner: one launcher run per cell,
finished cells of the same fingerprint reused); the report is
:mod:`launch.study_pretrained_report`'s.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from launch import study
from launch import study_pretrained as sp


def _log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h ({seconds / 60:.0f} min)"


def validate(configs: dict) -> None:
    """Every distinct run file through the launcher's own validation (no training)."""
    from agvm_ds.config.run import load_run_config

    with tempfile.TemporaryDirectory() as tmp:
        for i, cfg in enumerate(configs.values()):
            path = Path(tmp) / f"cell{i}.json"
            path.write_text(json.dumps(cfg))
            load_run_config(path, world_size=1)


def dry_run(args, base: dict, assignments: list, backbone: Path, threads: int) -> int:
    selection = sp.read_selection(args.out)
    placeholder = {f"{c.detector}/{c.optimizer}": {"interval": sp.CANDIDATES[0][0],
                                                   "momentum": sp.CANDIDATES[0][1]}
                   for c in sp.grid(args.full)}
    phases = (("select", sp.selection_cells(args.full), None),
              ("grid", sp.grid(args.full), selection or placeholder))
    total = 0.0
    for label, cells, sel in phases:
        configs = sp.configs_for(cells, base, assignments, backbone, args.backbone_norm, sel, args.full)
        validate(configs)
        seconds = sp.estimate(configs, args.jobs)
        total += seconds
        any_cfg = next(iter(configs.values()))
        _log(f"{label}: {len(cells)} cells, {any_cfg['data']['synthetic']['train']} images x "
             f"{any_cfg['train']['epochs']} epochs, {any_cfg['data']['synthetic']['val']} val images "
             f"per evaluation -> estimate {_hours(seconds)} on {args.jobs} slot(s) of {threads} thread(s)")
        for cell in cells:
            steps, warmup = study.schedule_steps(configs[cell], cell.batch)
            print(f"  {cell.name}: {steps} steps, warmup {warmup}, eval every "
                  f"{configs[cell]['train']['eval_every']}, lr {_lr(configs[cell], cell.batch):.4g}, "
                  f"~{sp.cell_seconds(cell, configs[cell]):.0f} s")
    _log(f"total estimate {_hours(total)} (rates of launch/study_pretrained.RATES; "
         f"budget 3 h for the default grid)")
    if args.full:
        _log("--full is the GPU grid: this estimate uses the 2-core machine's CPU rates (no GPU rate measured)")
    _log("tau/alpha: " + ("from " + str(args.out / "selection.json") if selection else
                          "no selection.json yet; the grid's AGVM cells wait for --select"))
    refusal = sp.check_backbone(backbone)
    _log("backbone weights: " + (str(backbone) if refusal is None else refusal.removeprefix("error: ")))
    return 0


def _lr(cfg: dict, batch: int) -> float:
    scaling = cfg["train"]["lr_scaling"]
    return scaling["base_lr"] * batch / scaling["base_batch"]


def main(args, argv) -> int:
    from agvm_ds.config.inherit import read_run_file

    if args.jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return 2
    assignments = [study.parse_assignment(a) for a in args.assignments]
    base = read_run_file(study.BASE_CONFIG)
    backbone = Path(args.backbone_checkpoint or sp.DEFAULT_BACKBONE)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if args.dry_run:
        return dry_run(args, base, assignments, backbone, threads)
    cells = study.pick_cells(sp.selection_cells(args.full) if args.select else sp.grid(args.full), args.cells,
                             sp.grid(args.full) + sp.selection_cells(args.full))
    if cells is None:
        return 2
    selection = sp.read_selection(args.out)
    command = args.command or "python launch/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.no_run:
        refusal = sp.check_backbone(backbone)
        if refusal is not None:
            print(refusal, file=sys.stderr)
            return 2
        if selection is None and any(c.agvm and not c.heldout for c in cells):
            print(f"error: {args.out / 'selection.json'} does not exist: AGVM's tau/alpha are chosen on "
                  f"the held-out draw first: python launch/study.py --grid pretrained --select",
                  file=sys.stderr)
            return 2
        configs = sp.configs_for(cells, base, assignments, backbone, args.backbone_norm, selection, args.full)
        _log(f"{len(cells)} cells, estimate {_hours(sp.estimate(configs, args.jobs))}")
        records = study.run_cells(configs, args.out / ("select" if args.select else ""), args.jobs,
                                  args.port, threads, _log)
        if args.select:
            aps = {c: _final_ap(args.out / "select" / c.name) if r["rc"] == 0 else None
                   for c, r in zip(cells, records)}
            doc = sp.write_selection(args.out, aps)
            _log(f"selection: {json.dumps(doc['chosen'])} -> {args.out / 'selection.json'}")
            return 0
    from launch.study_pretrained_report import write_report

    doc = write_report(args.out, args.doc, cells, command=command.strip(), selection_path=args.out / "selection.json")
    _log(f"report: {doc}")
    return 0


def _final_ap(cell_dir: Path):
    from launch.study_report import RUN_SUBDIR

    try:
        return float(json.loads((cell_dir / RUN_SUBDIR / "eval.json").read_text())["bbox_AP"])
    except (OSError, ValueError, KeyError):
        return None
