"""Resume timelines: a checkpoints folder holds one run's history, never an abandoned one's.

A run resumed from a checkpoint that is not the newest (``--resume …/step_0000008`` because
step 12 diverged), or started afresh in an output dir that holds checkpoints, writes tags
that interleave with those of the run it abandons. Left in place, the abandoned run's newer
tags would be what ``--resume auto`` continues, and pruning by step number
(``train.keep_checkpoints``) would delete this run's own checkpoints before them.
:func:`begin_timeline` therefore moves every ``step_<N>`` folder newer than the starting
point, complete or not and unchanged, into ``checkpoints/abandoned_<time>/``, which neither
``--resume auto`` nor pruning looks into (``--resume PATH`` still loads one), and says so in
one ``warning:`` line. Pruning also never deletes the checkpoint the run resumed from, nor the
one it has just written (:func:`agvm_ds.train.checkpoint.save_checkpoint`'s ``protect``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from agvm_ds import collectives
from agvm_ds.errors import CheckpointError
from agvm_ds.train.checkpoint import _TAG, read_marker
from agvm_ds.train.rundir import new_stamped_folder

__all__ = ["ABANDONED_PREFIX", "begin_timeline", "start_timeline", "tag_step"]

#: folders (inside ``checkpoints/``) holding the tags of abandoned timelines
ABANDONED_PREFIX = "abandoned_"


def tag_step(tag_dir: Path) -> int:
    """The step a ``step_<N>`` folder holds (its marker's, else its name's)."""
    try:
        return int(read_marker(tag_dir)["step"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        m = _TAG.match(tag_dir.name)
        return int(m.group(1)) if m else 0


def start_timeline(ckpt_dir: Path, base_step: int, stamp: Optional[str] = None) -> tuple[list[str], Optional[Path]]:
    """Make ``ckpt_dir`` hold only this run's timeline: a run that starts at ``base_step``
    (the step of the checkpoint it resumed from; 0 for a fresh start) will write tags after
    it, so every ``step_<N>`` folder with N > ``base_step`` there, complete or not, belongs to
    another, abandoned timeline — left where it is, ``--resume auto`` would continue it and
    pruning by step number would delete this run's checkpoints instead. They are moved,
    unchanged, into ``ckpt_dir/abandoned_<stamp>/``, which neither ``--resume auto`` nor
    pruning looks into. Rank 0 only; returns (moved tag names, their folder).
    """
    newer = []
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            m = _TAG.match(d.name)
            if m and d.is_dir() and int(m.group(1)) > base_step:
                newer.append((int(m.group(1)), d))
    if not newer:
        return [], None
    dest = new_stamped_folder(ckpt_dir, ABANDONED_PREFIX, stamp)
    names = []
    for _, d in sorted(newer):
        os.replace(d, dest / d.name)
        names.append(d.name)
    return names, dest


def begin_timeline(ckpt_dir: Path, tag_dir: Optional[Path], resume: Optional[str], rank: int) -> None:
    """Move the checkpoints newer than the one this run starts from out of ``ckpt_dir``
    (rank 0, one ``warning:`` line), so that ``--resume auto`` and pruning see only this
    run's timeline (:func:`start_timeline`); collective."""
    if rank == 0:
        base = tag_step(tag_dir) if tag_dir is not None else 0
        moved, dest = start_timeline(ckpt_dir, base)
        if moved:
            names = ", ".join(moved)
            if tag_dir is not None:
                why = (f"--resume {resume}: {tag_dir.name} is not the newest checkpoint, so this run starts a "
                       f"new timeline from it")
            else:
                why = f"a fresh run (no --resume) in {ckpt_dir.parent}, which holds checkpoints"
            print(f"warning: {why}; the newer checkpoint(s) of the abandoned run ({names}) moved to {dest}/ "
                  f"(--resume auto will not continue them; --resume PATH still can)", file=sys.stderr, flush=True)
    collectives.barrier()
