"""The large-batch study's report: tables, the gap figure and plots from the cells' outputs.

Reads, per cell of ``launch/study.py``'s grid, ``study_cell.json`` (steps, wall time, exit
code), ``eval.json`` (bbox AP) and ``metrics.jsonl`` (Φ, μ and B_noise on AGVM update
steps), and rewrites the block between :data:`BEGIN` and :data:`END` of the report file:
everything outside it (the reading of the results) is kept as written.

Gap figure, per optimizer and batch: ``(AP_AGVM - AP_plain) / (AP_plain@1x - AP_plain)``:
the fraction of the large-batch loss that AGVM wins back (1 = all of it, 0 = nothing, < 0 =
worse than plain). It is computed per seed (AGVM and plain of the same seed, against the
mean plain AP at 1x); the table gives the mean and the per-seed values.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from agvm_ds.train.metrics import read_metrics
from agvm_ds.train.plot import modulation_series

#: each cell's training run lives in ``<cell>/run/`` (the launcher keeps one run per folder);
#: the study's own files (``study_cell.json``, ``run_config.json``, the console) beside it
RUN_SUBDIR = "run"

BEGIN = "<!-- study:begin (written by launch/study.py; edits inside are replaced) -->"
END = "<!-- study:end -->"
ANCHOR = "backbone"


def load_cell(cell_dir: Path) -> dict | None:
    """One cell's record with its AP, final μ, Φ ratios and B_noise; None when it never ran."""
    try:
        record = json.loads((cell_dir / "study_cell.json").read_text())
    except (OSError, ValueError):
        return None
    run_dir = cell_dir / RUN_SUBDIR
    try:
        record["ap"] = float(json.loads((run_dir / "eval.json").read_text())["bbox_AP"])
    except (OSError, ValueError, KeyError):
        record["ap"] = float("nan")
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    record["series"] = modulation_series(rows)
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
    record["final_loss"] = losses[-1] if losses else float("nan")
    record["nonfinite_loss"] = any(not math.isfinite(v) for v in losses)
    updates = [r for r in rows if r.get("agvm")]
    last = updates[-1] if updates else {}
    record["final_mu"] = {m: s.get("mu") for m, s in (last.get("agvm") or {}).items()}
    record["b_noise"] = last.get("agvm_b_noise")
    record["phi_ratio"] = phi_ratios(record["series"], record.get("warmup_steps", 0))
    return record


def phi_ratios(series: dict, after_step: int) -> dict[str, float]:
    """Median over the post-warmup update steps of Φ_backbone / Φ_module: how far below the
    anchor's variance each module sits (> 1: lower variance, AGVM raises its lr)."""
    if ANCHOR not in series:
        return {}
    anchor = dict(zip(series[ANCHOR]["step"], series[ANCHOR]["phi"]))
    out = {}
    for module, d in series.items():
        ratios = [anchor[s] / p for s, p in zip(d["step"], d["phi"])
                  if s >= after_step and s in anchor and p > 0 and math.isfinite(anchor[s] / p)]
        out[module] = statistics.median(ratios) if ratios else float("nan")
    return out


def _fmt(x, digits=3) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _mean_sd(values: list[float]) -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def summarize(records: list[dict]) -> tuple[list[str], list[str], dict]:
    """(table lines, gap lines, grouped records)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["optimizer"], r["agvm"], r["batch"])].append(r)
    modules = sorted({m for r in records for m in r["final_mu"]}, key=lambda m: (m != ANCHOR, m))
    head = ("| optimizer | AGVM | batch | seeds | bbox AP (mean ± sd) | per seed | steps | wall s | "
            + " | ".join(f"Φ_bb/Φ {m}" for m in modules if m != ANCHOR) + " | "
            + " | ".join(f"final μ {m}" for m in modules if m != ANCHOR) + " | B_noise |")
    table = [head, "|" + "---|" * (head.count("|") - 1)]
    for (opt, agvm, batch), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        aps = [r["ap"] for r in rs]
        per_seed = ", ".join(f"s{r['seed']} {_fmt(r['ap'])}" + (" (failed)" if r["rc"] else "")
                             + (" (loss non-finite)" if r["nonfinite_loss"] else "") for r in rs)
        ratio = [_fmt(_avg(r["phi_ratio"].get(m) for r in rs), 2) for m in modules if m != ANCHOR]
        mu = [_fmt(_avg(r["final_mu"].get(m) for r in rs), 2) for m in modules if m != ANCHOR]
        table.append(f"| {opt} | {'yes' if agvm else 'no'} | {batch} | {len(rs)} | {_mean_sd(aps)} | "
                     f"{per_seed} | {rs[0]['steps']} | {_fmt(_avg(r['wall_s'] for r in rs), 0)} | "
                     + " | ".join(ratio) + " | " + " | ".join(mu) + f" | {_fmt(_avg(r['b_noise'] for r in rs), 1)} |")
    gaps = gap_lines(groups)
    return table, gaps, groups


def _avg(values) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.mean(vals) if vals else float("nan")


def gap_lines(groups: dict) -> list[str]:
    lines = ["| optimizer | batch | AP plain@1x | AP plain | AP AGVM | gap closed (mean) | per seed |",
             "|---|---|---|---|---|---|---|"]
    for opt in sorted({k[0] for k in groups}):
        ref = groups.get((opt, False, min(k[2] for k in groups if k[0] == opt)))
        if not ref:
            continue
        ap_ref = _avg(r["ap"] for r in ref)
        for batch in sorted({k[2] for k in groups if k[0] == opt}):
            if batch == ref[0]["batch"]:
                continue
            plain = {r["seed"]: r["ap"] for r in groups.get((opt, False, batch), [])}
            agvm = {r["seed"]: r["ap"] for r in groups.get((opt, True, batch), [])}
            per_seed = {}
            for s in sorted(set(plain) & set(agvm)):
                loss = ap_ref - plain[s]
                per_seed[s] = (agvm[s] - plain[s]) / loss if loss > 0 else float("nan")
            finite = [g for g in per_seed.values() if math.isfinite(g)]
            mean = statistics.mean(finite) if finite else float("nan")
            seeds = ", ".join(f"s{s} {_fmt(g, 2)}" for s, g in per_seed.items()) or "—"
            note = "" if finite or not per_seed else " (plain lost nothing here: no gap to close)"
            lines.append(f"| {opt} | {batch} | {_fmt(ap_ref)} | {_fmt(_avg(plain.values()))} | "
                         f"{_fmt(_avg(agvm.values()))} | {_fmt(mean, 2)}{note} | {seeds} |")
    return lines


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_phi(groups: dict, path: Path, per_epoch: bool = False) -> Path | None:
    """Fig. 1 style: Φ per module over training, plain cells (seed 0), smallest and largest batch.
    ``per_epoch``: x in epochs (records carry ``steps_per_epoch``), so that batches line up."""
    batches = sorted({k[2] for k in groups})
    opts = sorted({k[0] for k in groups})
    if not batches:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [batches[0]] + ([batches[-1]] if len(batches) > 1 else [])
    fig, axes = plt.subplots(len(opts), len(cols), figsize=(5.2 * len(cols), 3.6 * len(opts)),
                             squeeze=False, constrained_layout=True)
    for i, opt in enumerate(opts):
        for j, batch in enumerate(cols):
            ax = axes[i][j]
            for agvm, style in ((False, "-"), (True, ":")):
                rs = sorted(groups.get((opt, agvm, batch), []), key=lambda r: r["seed"])
                if not rs:
                    continue
                scale = rs[0]["steps_per_epoch"] if per_epoch else 1
                for k, (module, d) in enumerate(rs[0]["series"].items()):
                    ax.plot([s / scale for s in d["step"]], d["phi"], style, color=f"C{k}", linewidth=1.3,
                            label=f"{module}{' (AGVM)' if agvm else ''}")
            ax.set_yscale("log")
            ax.set_title(f"{opt}, batch {batch}: Φ per module (— plain, ··· AGVM)", fontsize=9)
            ax.set_xlabel("epoch" if per_epoch else "iteration")
            ax.set_ylabel("Φ = 1 − cos(G1, G2)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_ap(groups: dict, path: Path) -> Path | None:
    """bbox AP against batch per optimizer, plain and AGVM, one point per seed plus the mean."""
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for i, opt in enumerate(sorted({k[0] for k in groups})):
        for agvm, style in ((False, "--"), (True, "-")):
            keys = sorted(k for k in groups if k[0] == opt and k[1] == agvm)
            if not keys:
                continue
            xs = [k[2] for k in keys]
            means = [_avg(r["ap"] for r in groups[k]) for k in keys]
            label = f"{opt}{' + AGVM' if agvm else ''}"
            ax.plot(xs, means, style, marker="o", color=f"C{i}", label=label)
            for k in keys:
                ax.scatter([k[2]] * len(groups[k]), [r["ap"] for r in groups[k]], s=10,
                           color=f"C{i}", alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch (images)")
    ax.set_ylabel("bbox AP (val)")
    ax.set_title("AP against batch (same epochs; dots: seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_report(out: Path, doc: Path, cells, command: str) -> Path:
    records = [r for r in (load_cell(out / c.name) for c in cells) if r is not None]
    table, gaps, groups = summarize(records)
    images = doc.parent / "images"
    phi_png = plot_phi(groups, images / f"{doc.stem}_phi.png")
    ap_png = plot_ap(groups, images / f"{doc.stem}_ap.png")
    missing = [c.name for c in cells if not (out / c.name / "study_cell.json").exists()]
    block = [BEGIN, "", f"Command: `{command}`", "",
             f"Cells: {len(records)} of {len(cells)} ran"
             + (f"; not run: {', '.join(missing)}" if missing else "") + ".", "",
             "### Results per cell", "",
             "Φ_bb/Φ m: median over the post-warmup AGVM update steps of the backbone's Φ over "
             "module m's (> 1: m's gradient is less noisy than the backbone's, Fig. 1's "
             "misalignment). Final μ: the last logged multiplier (plain cells pin it to 1). "
             "B_noise: the model's smoothed gradient-noise scale at the last update step.", "",
             *table, "", "### Gap closed by AGVM", "",
             "(AP_AGVM − AP_plain) / (AP_plain@1× − AP_plain), per seed against the mean plain AP "
             "at the smallest batch.", "", *gaps, ""]
    for png, caption in ((phi_png, "Φ per module over training"), (ap_png, "AP against batch")):
        if png is not None:
            block += [f"![{caption}]({png.relative_to(doc.parent).as_posix()})", ""]
    block.append(END)
    return replace_block(doc, block, "# Large-batch study\n\n")


def replace_block(doc: Path, block: list[str], new_doc_head: str) -> Path:
    """Write ``block`` (BEGIN ... END lines) over the generated block of ``doc``, keeping
    everything outside it; a new doc starts with ``new_doc_head``."""
    text = doc.read_text() if doc.exists() else new_doc_head
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        post = rest.split(END, 1)[1]
        text = pre + "\n".join(block) + post
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(block) + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return doc
