"""Rank-side code for tests/test_selfcheck.py (module-level so spawned ranks can import it)."""

from __future__ import annotations

import os


def selfcheck_many(rank, world, cases):
    """Each case: (run dict, perturbation or None) -> (exit code, the lines rank 0 printed)."""
    from agvm_ds.selfcheck import selfcheck

    out = []
    for run_dict, perturb in cases:
        lines = []
        os.environ["AGVM_SELFCHECK_PERTURB"] = str(perturb or 0)
        code = selfcheck(run_dict, rank, world, say=lines.append)
        out.append((code, lines))
    os.environ.pop("AGVM_SELFCHECK_PERTURB", None)
    return out
