"""Draw docs/images/overhead.png from the JSON files bench/overhead.py writes.

Left: AGVM's own time per estimator and run (amortized and on update steps) against the
issue's targets. Right: the within-engine update-step ratio with its 95 % interval; the A/A
control shows how far the measurement wanders with nothing to find.

Usage: python bench/plot_overhead.py [--docs docs]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RUNS = (("zero2_gas2_tau10_sgd", "SGD 64 px"), ("zero2_gas2_tau10_adamw", "AdamW 64 px"),
        ("zero2_gas2_tau10_adamw_px128", "AdamW 128 px"))
ESTIMATORS = ("off (A/A control)", "micro", "ranks")


def load(docs: Path) -> list[tuple[str, dict]]:
    runs = []
    for key, label in RUNS:
        path = docs / f"overhead_{key}.json"
        if path.exists():
            runs.append((label, json.loads(path.read_text())))
    if not runs:
        raise SystemExit(f"no overhead_*.json under {docs}: run bench/overhead.py --out {docs}/benchmarks.md first")
    return runs


def plot(runs, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_own, ax_wall) = plt.subplots(1, 2, figsize=(11, 5.2))
    width = 0.8 / len(runs)
    for i, (label, summary) in enumerate(runs):
        rows = {r["estimator"]: r for r in summary["rows"]}
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(2)]
        own_amort = [100 * rows[e]["agvm_time_fraction_amortized"] for e in ("micro", "ranks")]
        own_upd = [100 * rows[e]["agvm_time_fraction_update"] for e in ("micro", "ranks")]
        bars = ax_own.bar(xs, own_upd, width * 0.9, label=f"{label}: update steps", alpha=0.45)
        ax_own.bar(xs, own_amort, width * 0.9, color=bars[0].get_facecolor()[:3], label=f"{label}: amortized")
        xs3 = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(ESTIMATORS))]
        est = [rows[e]["update_step_ratio_within_engine"] for e in ESTIMATORS]
        ax_wall.errorbar(xs3, [e[0] for e in est], yerr=[[e[0] - e[1] for e in est], [e[2] - e[0] for e in est]],
                         fmt="o", capsize=3, label=label)
    ax_own.axhline(0.5, color="k", lw=0.8, ls=":", label="target, amortized (0.5 %)")
    ax_own.axhline(5.0, color="k", lw=0.8, ls="--", label="target, update steps (5 %)")
    ax_own.set_xticks(range(2), ["micro (default)", "ranks"])
    ax_own.set_ylabel("AGVM's own time, % of an AGVM-off step")
    ax_own.set_yscale("log")
    ax_own.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    ax_wall.axhline(1.0, color="k", lw=0.8)
    ax_wall.axhline(1.05, color="k", lw=0.8, ls="--", label="target (1.05)")
    ax_wall.set_xticks(range(len(ESTIMATORS)), ["A/A control", "micro", "ranks"])
    ax_wall.set_ylabel("update step, within engine (÷ AGVM-off)")
    ax_wall.legend(fontsize=7)
    fig.suptitle("AGVM overhead, ZeRO-2, 2 CPU ranks, GAS 2, τ = 10 (bench/overhead.py)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    a = ap.parse_args(argv)
    out = a.docs / "images" / "overhead.png"
    plot(load(a.docs), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
