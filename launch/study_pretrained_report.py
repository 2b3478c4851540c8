"""The pretrained study's report (issue 33): every cell's seeds, final AP, AP at fixed epochs,
epochs to target, the one-sided tests of AGVM against plain at the same batch, the gap AGVM
closes, Fig. 1 in miniature, and a one-paragraph verdict filled from the numbers.

Reads per cell (``launch/study.py --grid pretrained``): ``study_cell.json``, ``run_config.json``
(images, batch: epochs are ``step x batch / images``), ``run/eval_history.jsonl`` (bbox AP at
every epoch) and ``run/metrics.jsonl`` (Φ per module). The statistics are
:mod:`launch.study_stats`'s; the target is ``TARGET_FRACTION`` (0.99) times the mean final AP
of the smallest batch's plain cells of the same detector and optimizer: a relative 1 %,
fixed per detector/optimizer before any large-batch cell is looked at, as MLPerf fixes an
absolute target per benchmark.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from agvm_ds.train.metrics import read_metrics
from agvm_ds.train.plot import modulation_series
from launch import study_stats as st
from launch.study_pretrained import TARGET_FRACTION
from launch.study_report import BEGIN, END, RUN_SUBDIR, plot_phi, replace_block

ALPHA = 0.05


def load_cell(cell_dir: Path) -> dict | None:
    """The cell's record with ``history`` [(epoch, AP)], ``ap`` (final), ``series`` (Φ) and
    ``steps_per_epoch``; None when it never ran."""
    try:
        record = json.loads((cell_dir / "study_cell.json").read_text())
        cfg = json.loads((cell_dir / "run_config.json").read_text())
    except (OSError, ValueError):
        return None
    run = cell_dir / RUN_SUBDIR
    images = cfg["data"]["synthetic"]["train"]
    record["steps_per_epoch"] = images / record["batch"]
    history = []
    if (run / "eval_history.jsonl").exists():
        for line in (run / "eval_history.jsonl").read_text().splitlines():
            row = json.loads(line)
            history.append((round(row["step"] * record["batch"] / images, 3), float(row["bbox_AP"])))
    record["history"] = sorted(history)
    record["ap"] = history[-1][1] if history and record.get("rc") == 0 else float("nan")
    rows = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    record["series"] = modulation_series(rows)
    return record


def _f(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return "∞" if math.isinf(x) else f"{x:.{digits}f}"


def _olympic(values, digits=3) -> str:
    mean, sd, kept = st.olympic(values)
    if kept == 0:
        return "—"
    if math.isinf(mean):
        return "not reached (≥ 2 censored)"
    return _f(mean, digits) + ("" if math.isnan(sd) else f" ± {_f(sd, digits)}")


def _ap_at(history, epoch):
    return next((ap for e, ap in history if abs(e - epoch) < 1e-6), float("nan"))


def analyse(records: list[dict]) -> dict:
    """Per (detector, optimizer): target, and per (agvm, batch) the seeds' values; per batch
    the AGVM-vs-plain tests and the gap closed."""
    by = defaultdict(list)
    for r in records:
        by[(r["detector"], r["optimizer"], r["agvm"], r["batch"])].append(r)
    out = {}
    for det, opt in sorted({k[:2] for k in by}):
        batches = sorted({k[3] for k in by if k[:2] == (det, opt)})
        ref = [r["ap"] for r in by.get((det, opt, False, batches[0]), []) if math.isfinite(r["ap"])]
        # no target without a x1 run that learned something: a target of 0 is "reached" by the
        # first evaluation of any run, which would make every epochs-to-target equal and empty
        target = TARGET_FRACTION * statistics.fmean(ref) if ref and statistics.fmean(ref) > 0 else float("nan")
        cells = {}
        for (d, o, agvm, batch), rs in by.items():
            if (d, o) != (det, opt):
                continue
            rs = sorted(rs, key=lambda r: r["seed"])
            ett = []
            for r in rs:
                reached, _ = st.epochs_to_target(r["history"], target) if math.isfinite(target) else (None, 0)
                ett.append(math.inf if reached is None else reached)
            cells[(agvm, batch)] = {"records": rs, "ap": [r["ap"] for r in rs], "ett": ett}
        tests = {}
        for batch in batches:
            plain, agvm = cells.get((False, batch)), cells.get((True, batch))
            if not plain or not agvm:
                continue
            pa = [v for v in plain["ap"] if math.isfinite(v)]
            ga = [v for v in agvm["ap"] if math.isfinite(v)]
            tests[batch] = {
                "welch_ap": st.welch_greater(ga, pa)[2],
                "perm_ap": st.permutation_greater(ga, pa) if pa and ga else float("nan"),
                "perm_ett": st.permutation_greater(agvm["ett"], plain["ett"], statistic=st.prob_smaller),
                "gap_p": st.welch_greater(ref, pa)[2] if batch != batches[0] else float("nan"),
                "gap": (statistics.fmean(ref) - statistics.fmean(pa)) if ref and pa else float("nan"),
                "closed": st.gap_closed(ref, pa, ga) if ref and pa and ga and batch != batches[0]
                else (float("nan"),) * 3,
                "diff": (statistics.fmean(ga) - statistics.fmean(pa)) if pa and ga else float("nan"),
            }
        out[(det, opt)] = {"target": target, "batches": batches, "cells": cells, "tests": tests}
    return out


def table_lines(analysis: dict) -> list[str]:
    head = ("| detector | optimizer | batch | AGVM | seeds | final AP per seed | final AP (olympic ± sd) | "
            "AP @ half | epochs to target per seed | epochs to target (olympic) | p AP (Welch) | "
            "p AP (perm.) | p epochs (perm.) | gap closed (95 % CI) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (det, opt), a in analysis.items():
        for (agvm, batch), c in sorted(a["cells"].items(), key=lambda kv: (kv[0][1], kv[0][0])):
            rs = c["records"]
            epochs = max((r["history"][-1][0] for r in rs if r["history"]), default=float("nan"))
            half = [_ap_at(r["history"], round(epochs / 2)) for r in rs] if math.isfinite(epochs) else []
            t = a["tests"].get(batch) if agvm else None
            closed = t["closed"] if t else (float("nan"),) * 3
            lines.append(
                f"| {det} | {opt} | {batch} | {'yes' if agvm else 'no'} | {len(rs)} | "
                + ", ".join(f"s{r['seed']} {_f(r['ap'])}" + (" (failed)" if r.get("rc") else "") for r in rs)
                + f" | {_olympic([v for v in c['ap'] if math.isfinite(v)])} | {_olympic([v for v in half if math.isfinite(v)])} | "
                + ", ".join(">" + _f(epochs, 0) if math.isinf(e) else _f(e, 0) for e in c["ett"])
                + f" | {_olympic(c['ett'], digits=1)} | {_f(t['welch_ap'] if t else None)} | "
                f"{_f(t['perm_ap'] if t else None)} | {_f(t['perm_ett'] if t else None)} | "
                + (f"{_f(100 * closed[0], 0)} % ({_f(100 * closed[1], 0)} – {_f(100 * closed[2], 0)} %)"
                   if math.isfinite(closed[0]) else "—") + " |")
    return lines


def verdict(analysis: dict) -> str:
    """One paragraph, filled from the numbers at each detector/optimizer's largest batch."""
    parts = []
    for (det, opt), a in analysis.items():
        top = a["batches"][-1]
        t = a["tests"].get(top)
        if t is None or top == a["batches"][0]:
            parts.append(f"{det}/{opt}: the cells to compare at the largest batch have not run.")
            continue
        x = top // a["batches"][0]
        head = f"{det}/{opt} at ×{x} (batch {top}): "
        if not (t["gap"] > 0 and t["gap_p"] < ALPHA):
            parts.append(head + f"no gap — plain loses {_f(t['gap'])} AP against ×1 (one-sided Welch "
                         f"p = {_f(t['gap_p'])}); AGVM − plain = {_f(t['diff'])} AP (p = {_f(t['welch_ap'])}).")
            continue
        point, lo, hi = t["closed"]
        effect = (f"AGVM closes {_f(100 * point, 0)} % (95 % CI {_f(100 * lo, 0)} – {_f(100 * hi, 0)} %) "
                  f"of the gap")
        if not (t["welch_ap"] < ALPHA or t["perm_ett"] < ALPHA):
            effect += " — no effect distinguishable from seed noise"
        parts.append(head + f"plain loses {_f(t['gap'])} AP against ×1 (p = {_f(t['gap_p'])}); {effect} "
                     f"(AP: Welch p = {_f(t['welch_ap'])}, permutation p = {_f(t['perm_ap'])}; epochs to "
                     f"target: permutation p = {_f(t['perm_ett'])}).")
    return " ".join(parts) if parts else "No cells have run yet."


def write_report(out: Path, doc: Path, cells, command: str, selection_path: Path | None = None) -> Path:
    records = []
    for c in cells:
        r = load_cell(out / c.name)
        if r is not None:
            r.update(detector=c.detector, optimizer=c.optimizer, agvm=c.agvm, batch=c.batch, seed=c.seed)
            records.append(r)
    analysis = analyse(records)
    groups = defaultdict(list)  # plot_phi's keys: (panel label, agvm, batch)
    for r in records:
        groups[(f"{r['detector']} {r['optimizer']}", r["agvm"], r["batch"])].append(r)
    phi_png = plot_phi(groups, doc.parent / "images" / f"{doc.stem}_phi.png", per_epoch=True) if groups else None
    missing = [c.name for c in cells if not (out / c.name / "study_cell.json").exists()]
    try:
        selection = json.loads(selection_path.read_text()) if selection_path else None
    except (OSError, ValueError):
        selection = None
    text = verdict(analysis)
    block = [BEGIN, "", f"Command: `{command}`", "",
             f"Cells: {len(records)} of {len(cells)} ran" + (f"; not run: {len(missing)}" if missing else "")
             + f"; their training and evaluation took {sum(r.get('wall_s', 0.0) for r in records) / 3600:.2f} h "
             "of cell time (the sum over cells; `--jobs` of them run at once).", "",
             "Targets (0.99 × the mean final AP of the smallest batch's plain cells): "
             + (", ".join(f"{d}/{o} {_f(a['target'])}" for (d, o), a in analysis.items()) or "—") + ".", "",
             "AGVM's τ/α (held-out draw, `selection.json`): "
             + (json.dumps(selection["chosen"]) if selection else "no selection yet") + ".", "",
             "### Results per cell", "",
             "p-values are one-sided, AGVM against plain at the same batch (H1: higher final AP; fewer "
             "epochs to target). Epochs to target: `>E` = never reached by the last evaluation (censored, "
             "slower than every run that reached it). Gap closed: (AP_AGVM − AP_plain) / (AP_plain@1× − "
             "AP_plain), bootstrap over seeds. A failed cell (exit ≠ 0, e.g. stopped on non-finite "
             "gradients) is left out of the AP statistics and counts as never reaching the target.", "",
             *table_lines(analysis), "", "### Verdict (filled from the numbers)", "", text, ""]
    if phi_png is not None:
        block += [f"![Φ per module over training]({phi_png.relative_to(doc.parent).as_posix()})", ""]
    block.append(END)
    print(text)
    return replace_block(doc, block, "# Large-batch study under the paper's conditions\n\n")
