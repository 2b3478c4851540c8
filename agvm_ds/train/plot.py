"""Per-module Φ, μ and the gradient-noise scale over training, in the style of the paper's Fig. 1.

Three panels: Φ = 1 − cos(G1, G2) per module on a log axis (the paper's "gradient variance",
learning rate omitted), the multiplier μ per module, and the smoothed gradient-noise scale
B_noise per module (log axis; the whole model's dashed, the run's global batch dotted, when
known). Read from ``metrics.jsonl``.

Usage: ``python -m agvm_ds.train.plot runs/quickstart/metrics.jsonl [--out FIG.png]``.

Limitations:
    Φ ≤ 0 (perfectly aligned halves, or a cosine that rounds above 1) cannot be drawn on a
    log axis; such points are clipped to 1e-8. An undefined B_noise (``null``: a smoothed
    term ≤ 0) leaves a gap. Records written before B_noise existed draw no third panel.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

from agvm_ds.train.metrics import read_metrics


def _value(x) -> float:
    return float("nan") if x is None else float(x)


def modulation_series(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """``{module: {"step": [...], "phi": [...], "mu": [...], "b_noise": [...]}}`` from metrics
    records (NaN where a value is missing)."""
    series: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        for module, s in (r.get("agvm") or {}).items():
            d = series.setdefault(module, {"step": [], "phi": [], "mu": [], "b_noise": []})
            d["step"].append(r["step"])
            phi = s.get("phi")
            if phi is None and s.get("cos") is not None:
                phi = 1.0 - s["cos"]
            d["phi"].append(float("nan") if phi is None else max(float(phi), 1e-8))
            d["mu"].append(_value(s.get("mu")))
            d["b_noise"].append(_value(s.get("b_noise")))
    return series


def model_noise_series(rows: list[dict]) -> dict[str, list[float]]:
    """``{"step", "b_noise"}`` of the whole model's B_noise (``agvm_b_noise``) on update steps."""
    steps = [r for r in rows if r.get("agvm") and "agvm_b_noise" in r]
    return {"step": [r["step"] for r in steps], "b_noise": [_value(r["agvm_b_noise"]) for r in steps]}


def _drawable(values: list[float]) -> bool:
    return any(math.isfinite(v) and v > 0 for v in values)


def plot_modulation(metrics_path: Path, out_path: Path, title: Optional[str] = None,
                    global_batch: Optional[int] = None) -> Optional[Path]:
    """Write the PNG; return its path, or None when no AGVM update was logged.
    ``global_batch``: drawn beside B_noise, the batch this run trained with."""
    rows = read_metrics(metrics_path)
    series = modulation_series(rows)
    if not series:
        return None
    model = model_noise_series(rows)
    noise = any(_drawable(d["b_noise"]) for d in series.values()) or _drawable(model["b_noise"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if noise else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), constrained_layout=True)
    ax_phi, ax_mu = axes[0], axes[1]
    for module, d in series.items():
        ax_phi.plot(d["step"], d["phi"], label=module, linewidth=1.4)
        ax_mu.plot(d["step"], d["mu"], label=module, linewidth=1.4)
    ax_phi.set_yscale("log")
    ax_phi.set_ylabel(r"$\Phi = 1 - \cos(G_1, G_2)$")
    ax_phi.set_title("gradient variance per module")
    ax_mu.axhline(1.0, color="0.6", linewidth=0.8, linestyle="--")
    ax_mu.set_ylabel(r"$\mu$ (lr multiplier)")
    ax_mu.set_title("AGVM multiplier per module")
    if noise:
        ax_b = axes[2]
        for module, d in series.items():  # same colour cycle as the other panels
            ax_b.plot(d["step"], d["b_noise"], label=module, linewidth=1.4)
        if _drawable(model["b_noise"]):
            ax_b.plot(model["step"], model["b_noise"], label="model", color="k", linewidth=1.2, linestyle="--")
        if global_batch:
            ax_b.axhline(global_batch, color="0.4", linewidth=1.0, linestyle=":", label=f"global batch {global_batch}")
        ax_b.set_yscale("log")
        ax_b.set_ylabel(r"$B_\mathrm{noise} = \mathrm{tr}\,\Sigma\,/\,|G|^2$ (samples)")
        ax_b.set_title("gradient-noise scale (smoothed)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot per-module Φ, μ and B_noise from metrics.jsonl")
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--global-batch", type=int, default=None, help="drawn beside B_noise")
    args = parser.parse_args(argv)
    out = args.out or args.metrics.with_name("agvm_modulation.png")
    if plot_modulation(args.metrics, out, title=args.metrics.parent.name, global_batch=args.global_batch) is None:
        print(f"error: no AGVM updates in {args.metrics}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
