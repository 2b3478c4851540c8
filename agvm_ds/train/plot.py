"""Per-module Φ and μ over training, in the style of the paper's Fig. 1.

Two panels: Φ = 1 − cos(G1, G2) per module on a log axis (the paper's "gradient variance",
learning rate omitted), and the multiplier μ per module. Read from ``metrics.jsonl``.

Usage: ``python -m agvm_ds.train.plot runs/quickstart/metrics.jsonl [--out FIG.png]``.

Limitations:
    Φ ≤ 0 (perfectly aligned halves, or a cosine that rounds above 1) cannot be drawn on a
    log axis; such points are clipped to 1e-8.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from agvm_ds.train.metrics import read_metrics


def modulation_series(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """``{module: {"step": [...], "phi": [...], "mu": [...]}}`` from metrics records."""
    series: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        for module, s in (r.get("agvm") or {}).items():
            d = series.setdefault(module, {"step": [], "phi": [], "mu": []})
            d["step"].append(r["step"])
            phi = s.get("phi")
            if phi is None and s.get("cos") is not None:
                phi = 1.0 - s["cos"]
            d["phi"].append(float("nan") if phi is None else max(float(phi), 1e-8))
            d["mu"].append(float("nan") if s.get("mu") is None else float(s["mu"]))
    return series


def plot_modulation(metrics_path: Path, out_path: Path, title: Optional[str] = None) -> Optional[Path]:
    """Write the two-panel PNG; return its path, or None when no AGVM update was logged."""
    series = modulation_series(read_metrics(metrics_path))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_phi, ax_mu) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for module, d in series.items():
        ax_phi.plot(d["step"], d["phi"], label=module, linewidth=1.4)
        ax_mu.plot(d["step"], d["mu"], label=module, linewidth=1.4)
    ax_phi.set_yscale("log")
    ax_phi.set_xlabel("iteration")
    ax_phi.set_ylabel(r"$\Phi = 1 - \cos(G_1, G_2)$")
    ax_phi.set_title("gradient variance per module")
    ax_mu.axhline(1.0, color="0.6", linewidth=0.8, linestyle="--")
    ax_mu.set_xlabel("iteration")
    ax_mu.set_ylabel(r"$\mu$ (lr multiplier)")
    ax_mu.set_title("AGVM multiplier per module")
    for ax in (ax_phi, ax_mu):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot per-module Φ and μ from metrics.jsonl")
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or args.metrics.with_name("agvm_modulation.png")
    if plot_modulation(args.metrics, out, title=args.metrics.parent.name) is None:
        print(f"error: no AGVM updates in {args.metrics}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
