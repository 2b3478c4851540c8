"""Rank-side code for tests/test_selfcheck.py (module-level so spawned ranks can import it)."""

from __future__ import annotations

import os


def selfcheck_many(rank, world, cases):
    """Each case: (run dict, perturbation or None[, "unapplied_scale"]) -> (exit code, the lines
    rank 0 printed). ``unapplied_scale`` plants DeepSpeed 0.19.8's ZeRO-0 fp16 bug on an
    autocast run: the GradScaler reports its scale but never multiplies the loss by it."""
    import torch

    from agvm_ds.selfcheck import selfcheck

    out = []
    for run_dict, perturb, *plant in cases:
        lines = []
        os.environ["AGVM_SELFCHECK_PERTURB"] = str(perturb or 0)
        real_scale = torch.amp.GradScaler.scale
        if plant == ["unapplied_scale"]:
            # the scaler is set up and reports its scale (scale() runs), but the loss goes back unscaled
            torch.amp.GradScaler.scale = lambda self, outputs: (real_scale(self, outputs), outputs)[1]
        try:
            code = selfcheck(run_dict, rank, world, say=lines.append)
        finally:
            torch.amp.GradScaler.scale = real_scale
        out.append((code, lines))
    os.environ.pop("AGVM_SELFCHECK_PERTURB", None)
    return out
