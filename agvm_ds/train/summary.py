"""The console lines a run ends with: what a user came for, once.

Printed by rank 0 after the last step, the final checkpoint and the final evaluation
(:func:`agvm_ds.train.loop.train`)::

    [agvm-ds] done: 900 steps in 158.7 s of training (176 ms/step), 180.1 s since start
    [agvm-ds] final μ (update at step 890): backbone 1.000 (anchor), neck 1.023, head 1.052
    [agvm-ds] eval at step 900: bbox_AP=0.6386, bbox_AP50=0.8292, bbox_AP75=0.7461
    [agvm-ds] checkpoint: runs/quickstart/checkpoints/step_0000900
    [agvm-ds] outputs in runs/quickstart

The final evaluation's metrics appear here only (an evaluation during the run prints its
own line when it happens). :func:`bar_mu` is the μ the progress bar shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["bar_mu", "eval_line", "mu_line", "peak_rss_bytes", "summary_lines"]

#: the metrics an evaluation line shows (the rest are in eval.json)
HEADLINE = ("AP", "AP50", "AP75", "mIoU", "mAcc")


def eval_line(step: int, stats: dict) -> str:
    shown = [(k, v) for k, v in stats.items() if isinstance(v, float) and k.rsplit("_", 1)[-1] in HEADLINE]
    return f"eval at step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in shown)


def mu_line(modulation: Optional[dict], active: bool) -> Optional[str]:
    """μ per module after the last update (the first module is the anchor)."""
    mu = (modulation or {}).get("mu") or {}
    if not mu:
        return None
    step = (modulation or {}).get("step", -1)
    parts = [f"{name} {value:.3f}" + (" (anchor)" if i == 0 else "") for i, (name, value) in enumerate(mu.items())]
    if step is None or step < 0:
        why = "" if active else " (AGVM never became active)"
        return "final μ: no AGVM update ran" + why + "; " + ", ".join(parts)
    return f"final μ (update at step {step}): " + ", ".join(parts)


def bar_mu(modulation: Optional[dict]) -> dict[str, str]:
    """``{"mu_<head>": "1.87"}`` for the progress bar: the μ of the last module (the head
    in every shipped partition); empty with AGVM off."""
    mu = (modulation or {}).get("mu") or {}
    if not mu:
        return {}
    name, value = list(mu.items())[-1]
    return {f"mu_{name}": f"{value:.2f}"}


def summary_lines(steps: int, trained: int, train_s: float, wall_s: float, modulation: Optional[dict],
                  agvm_active: bool, stats: Optional[dict], checkpoint: Optional[Path], out_dir: Path) -> list[str]:
    """The end-of-run lines (see the module docstring); ``trained``: steps this process ran."""
    per_step = f" ({1000 * train_s / trained:.0f} ms/step)" if trained else ""
    resumed = f", {trained} of them in this run" if trained != steps else ""
    lines = [f"done: {steps} steps{resumed} in {train_s:.1f} s of training{per_step}, "
             f"{wall_s:.1f} s since start"]
    mu = mu_line(modulation, agvm_active)
    if mu:
        lines.append(mu)
    if stats is not None:
        lines.append(eval_line(stats.get("step", steps), stats))
    if checkpoint is not None:
        lines.append(f"checkpoint: {checkpoint}")
    lines.append(f"outputs in {out_dir}")
    return lines


def peak_rss_bytes() -> Optional[int]:
    """This process's peak resident set size (``VmHWM``; Linux only, else None)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
