"""Checkpoints through ``engine.save_checkpoint`` with a completion marker, and resumption.

Layout: ``<out>/checkpoints/step_<N>/`` is one DeepSpeed tag (model, optimizer and ZeRO
partitions, ``client_state``), plus ``rng_rank<r>.pt`` per rank and, written by rank 0
only after every rank finished writing, ``agvm_ds_complete.json``. ``--resume auto`` takes
the newest tag that has the marker, so a run killed while saving resumes from the
previous, intact checkpoint.

``client_state`` holds ``step`` (optimizer steps done), ``sampler`` (epoch / step in
epoch / seed / world size), ``rng`` (rank 0's generator states) and ``run`` (config name).

Notes:
    AGVM's own state (μ per module, the skip counter) travels with the engine's
    checkpoint (the core saves it); nothing here needs to know about it.

Limitations:
    Resuming needs the same world size (DeepSpeed's ZeRO partitions are per rank); a
    different size needs DeepSpeed's universal-checkpoint conversion, which knows only
    Adam's state names (design §3).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from agvm_ds import collectives
from agvm_ds.config.base import ConfigError

MARKER = "agvm_ds_complete.json"
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain types only, so that loading them with
    ``torch.load(..., weights_only=True)`` never unpickles an arbitrary object."""
    version, internal, gauss = random.getstate()
    key, words, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss": gauss},
            "numpy": {"key": str(key), "state": torch.from_numpy(np.asarray(words, dtype=np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["key"], npy["state"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])


def _rank() -> int:
    return collectives.rank()


def _barrier() -> None:
    collectives.barrier()


def complete_tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, tag dir) of every complete checkpoint under ``ckpt_dir``, oldest first."""
    found = []
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            m = _TAG.match(d.name)
            if m and (d / MARKER).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any],
                    keep: int = 0) -> Path:
    """Save ``step`` on every rank (collective); mark it complete; prune to ``keep`` (0 = all)."""
    tag = tag_for(step)
    state = {**client_state, "step": step, "rng": rng_state()}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state)
    tag_dir = ckpt_dir / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tag_dir / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        tmp = tag_dir / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"step": step, "tag": tag}))
        tmp.replace(tag_dir / MARKER)
        if keep > 0:
            for _, old in complete_tags(ckpt_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return tag_dir


def resolve_resume(resume: Optional[str], ckpt_dir: Path) -> Optional[Path]:
    """The tag directory to load for ``--resume`` (``auto`` | a tag dir | a checkpoints dir).

    ``auto`` with no complete checkpoint yet means a fresh start (None). An explicit path
    that holds no complete checkpoint is a :class:`ConfigError`.
    """
    if not resume:
        return None
    if resume == "auto":
        tags = complete_tags(ckpt_dir)
        return tags[-1][1] if tags else None
    path = Path(resume)
    if (path / MARKER).is_file():
        return path
    tags = complete_tags(path)
    if tags:
        return tags[-1][1]
    raise ConfigError(f"--resume {resume}: no complete checkpoint there "
                      f"(expected {MARKER} in a step_<N> folder)")


def load_checkpoint(engine, tag_dir: Path) -> dict[str, Any]:
    """Load model, optimizer and ZeRO state of ``tag_dir``; return its ``client_state``."""
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
    rng_file = tag_dir / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        try:
            state = torch.load(rng_file, weights_only=True)  # tensors and plain types only
        except Exception as err:  # noqa: BLE001 - an old pickled or a foreign file: refuse, run nothing
            raise RuntimeError(f"{rng_file}: not a plain-tensor RNG state ({type(err).__name__})") from None
        set_rng_state(state)
    return client_state or {}
