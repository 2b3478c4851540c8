"""Test-only knobs of the training loop (the process group is :mod:`agvm_ds.process_group`'s).

Notes:
    * ``AGVM_DS_FAULT_AT_STEP=N`` makes rank ``AGVM_DS_FAULT_RANK`` (default 1) leave with
      ``os._exit(17)`` just before optimizer step N+1 (i.e. after N steps) — for tests
      of crash handling and resumption; never set it in real runs.
"""

from __future__ import annotations

import os
import sys

FAULT_EXIT_CODE = 17


def maybe_inject_fault(steps_done: int, rank: int) -> None:
    """Test-only: die hard on the configured rank once ``steps_done`` reaches the set step."""
    at = os.environ.get("AGVM_DS_FAULT_AT_STEP")
    if at is None or int(at) != steps_done:
        return
    if rank == int(os.environ.get("AGVM_DS_FAULT_RANK", "1")):
        print(f"[agvm-ds] AGVM_DS_FAULT_AT_STEP={at}: rank {rank} exits now", file=sys.stderr,
              flush=True)
        os._exit(FAULT_EXIT_CODE)


def poison_loss(loss, steps_done: int):
    """Test-only: with ``AGVM_DS_NAN_FROM_STEP=N`` every loss from step ``N`` on (0-based) is
    NaN, so every later optimizer step is skipped (``train.max_consecutive_skips``)."""
    at = os.environ.get("AGVM_DS_NAN_FROM_STEP")
    if at is None or steps_done < int(at):
        return loss
    return loss * float("nan")

