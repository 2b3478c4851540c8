"""What the one-process tools (evaluate, predict, export, partition) share before torch loads.

Nothing here imports torch or ``agvm_ds`` (whose import loads torch): :func:`set_cpu_threads`
must run before torch does, and a usage error should not wait ~2 s for it.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional

#: variables a process launcher (deepspeed, torchrun, mpirun) sets in its ranks
_LAUNCHED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK")


def cores_available(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup (v2) CPU
    quota where one is set (a container limited to 2 CPUs on a 64-core host)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = open(cgroup_cpu_max).read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def set_cpu_threads(environ: Optional[dict] = None) -> Optional[int]:
    """For a tool run as one plain process: ``OMP_NUM_THREADS`` = :func:`cores_available` and
    ``OMP_WAIT_POLICY=PASSIVE``, each unless the user set it. Nothing for a launcher's rank
    (deepspeed/torchrun give those their share; ``agvm_ds.process_group``) or once torch
    is loaded (OpenMP reads both at torch's import: they would change nothing then but our
    children's environment). Returns the thread count set, or None.

    Why, both measured on this project's 2-core machine under a load of ~8 (issue 32: "6x
    slower under load"), one tiny-RetinaNet forward at 320 x 416:

    * torch sizes its CPU pool from the machine's cores (cpuinfo), not from the cores this
      process may run on (its affinity mask, a container's CPU quota): more threads than
      usable cores oversubscribe them;
    * even with exactly one thread per core, OpenMP threads spin-wait at the end of every
      parallel region (GNU's default policy), and on a loaded machine a region then lasts
      until the descheduled sibling thread gets a core back: 1.8 s per forward with torch's
      default 2 threads (2.6 s with ``OMP_NUM_THREADS=2`` alone), 0.15 s with 2 threads and
      the passive policy (sleeping waits), 0.07 s with 1 thread. The passive policy keeps
      the cores for an idle machine and loses the collapse under load."""
    env = os.environ if environ is None else environ
    if any(k in env for k in _LAUNCHED) or "torch" in sys.modules:
        return None
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "OMP_NUM_THREADS" in env:
        return None
    cores = cores_available()
    env["OMP_NUM_THREADS"] = str(cores)
    return cores


def add_test_arguments(parser, score: bool = True, recorded: bool = False) -> None:
    """``--min_size``, ``--max_size`` (and ``--score_threshold``): the test-time options
    (:mod:`agvm_ds.inference.test_time`)."""
    parser.add_argument("--min_size", type=int, nargs="+", default=None, metavar="N",
                        help=("recorded as " if recorded else "") + "the test-time short side "
                        "(default: the model's: its evaluation size, or the one its export records); "
                        "several sizes: predict at each and merge the boxes (test-time augmentation)")
    parser.add_argument("--max_size", type=int, default=None, metavar="N",
                        help=("recorded as " if recorded else "") + "the test-time cap on the long side "
                        "(default: the model's)")
    if score:
        parser.add_argument("--score_threshold", type=float, default=None,
                            help="recorded as predict's default score threshold" if recorded else
                            "drop detections scoring below this (default: the one an export "
                            "records, else 0.3)")


def check_test_arguments(parser, args) -> None:
    """Refuse non-positive sizes and a threshold outside [0, 1] at parse time (exit 2)."""
    if args.min_size is not None and any(s < 1 for s in args.min_size):
        parser.error(f"--min_size: positive integers, got {args.min_size}")
    if args.max_size is not None and args.max_size < 1:
        parser.error(f"--max_size: a positive integer, got {args.max_size}")
    threshold = getattr(args, "score_threshold", None)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        parser.error(f"--score_threshold: must be in [0, 1], got {threshold}")
