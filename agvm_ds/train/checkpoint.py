"""Checkpoints through ``engine.save_checkpoint`` with a verified completion marker, and resumption.

Layout: ``<out>/checkpoints/step_<N>/`` is one DeepSpeed tag (model, optimizer and ZeRO
partitions, ``client_state``), plus ``rng_rank<r>.pt`` per rank and ``agvm_ds_complete.json``,
written by rank 0 last, after every rank has written its files. The marker records the
layout the tag was saved with (``world_size``, ``zero_stage``, ``micro_batch``,
``grad_accum``) and every file of the tag with its size, CRC-32 and writing rank.

Saving (collective, :func:`save_checkpoint`): a tag that is written again loses its marker
first; DeepSpeed writes through :class:`~agvm_ds.checkpoint_engine.SafeCheckpointEngine`,
which reports the paths it wrote; each rank reads its files back for size and CRC-32 (about
4 GB/s from the page cache: 2 ms per save of the quickstart's 11.5 MB tag); rank 0
gathers them, writes the marker (temp file + rename) and only then prunes to
``keep_checkpoints`` (never the tag just written, nor the one the run resumed from). A save killed part-way leaves a tag without a marker and every older
tag untouched; files are not fsync'ed: after a power loss a tag whose data did not reach
the disk fails its checksum instead.

Timelines: a run that resumes from a checkpoint that is not the newest (or starts afresh in
a folder that holds checkpoints) starts a new timeline (:mod:`agvm_ds.train.timeline`).

Resuming: :func:`resolve_resume` (cheap, rank-local: marker JSON, file sizes) picks the
tag; ``--resume auto`` takes the newest complete one and skips, with a ``warning:`` line
naming the file, a tag whose marker is not valid JSON or whose files are missing or of the
wrong size. :func:`check_resumable` refuses a tag saved with another world size, ZeRO stage,
micro batch or accumulation count (:class:`CheckpointError`, i.e. ``error:`` and exit 2,
before anything is built). :func:`select_checkpoint` (collective) adds the expensive part:
each rank recomputes the CRC-32 of the files it wrote and loads each with
``torch.load(weights_only=True)`` (memory-mapped, so tensors are not read); ranks agree on
the outcome. A checksum mismatch is damage (``auto`` skips to the previous tag, an explicit
path is refused); a file whose checksum matches but that asks to unpickle anything outside
:func:`~agvm_ds.checkpoint_engine.deepspeed_globals` is refused in both cases. DeepSpeed's
own loads then go through the same weights_only loader, and the RNG files are loaded with
``weights_only=True`` too.

``client_state`` holds ``step`` (optimizer steps done), ``sampler`` (epoch / step in epoch
/ seed / world size), ``rng`` (rank 0's generator states), ``run`` (config name),
``global_batch`` and ``agvm`` (μ and the modulator state, which the checkpoint engine adds
to DeepSpeed's model-states file and restores from it: :mod:`agvm_ds.checkpoint_engine`):
all tensors and plain types.

Limitations:
    Resuming needs the same ZeRO stage and batch layout. Another world size is loaded from
    the ``elastic_rank<r>.pt`` files (:mod:`agvm_ds.train.elastic`, written through
    ``save_checkpoint``'s ``extra``) when the run is supported there (fp32, ZeRO 0/2/3,
    SGD/AdamW, the same micro and global batch) and refused otherwise; DeepSpeed's own ZeRO
    partitions are per rank. A marker written before
    the manifest existed (``{"step", "tag"}`` only) is trusted without size, checksum or
    layout checks. All ranks must see the same checkpoint folder (a shared file system).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from agvm_ds import collectives
from agvm_ds.checkpoint_engine import SafeCheckpointEngine, safe_load
from agvm_ds.errors import CheckpointError
from agvm_ds.errors import ConfigError
# the marker's name, its reader and the checksum: one definition, shared with every reader
# of a checkpoint after training (agvm_ds.inference.verify)
from agvm_ds.inference.verify import MARKER, crc32_of, member_problem, read_marker

MARKER_FORMAT = 2
LAYOUT_KEYS = ("world_size", "zero_stage", "micro_batch", "grad_accum")
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def layout(world_size: int, zero_stage: int, micro_batch: int, grad_accum: int) -> dict[str, int]:
    """What a checkpoint can only be resumed with, as recorded in its marker."""
    return dict(zip(LAYOUT_KEYS, (int(world_size), int(zero_stage), int(micro_batch), int(grad_accum))))


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


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def complete_tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, tag dir) of every checkpoint under ``ckpt_dir`` that has a marker, oldest first."""
    found = []
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            m = _TAG.match(d.name)
            if m and (d / MARKER).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


# --------------------------------------------------------------------------- saving
def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any],
                    keep: int = 0, extra: Optional[Callable[[Path], list]] = None,
                    protect: tuple[Path, ...] = ()) -> Path:
    """Save ``step`` on every rank (collective); mark it complete; prune to ``keep`` (0 = all).

    ``extra(tag_dir)`` writes further files of this rank (e.g. the elastic state) and returns
    their paths, which the marker then lists and checksums like DeepSpeed's. Pruning keeps
    the newest ``keep`` complete tags and never deletes the tag just written or one in
    ``protect`` (the checkpoint the run resumed from).

    ``engine`` must use :class:`SafeCheckpointEngine` (``agvm_ds.initialize`` installs it).
    """
    writer = engine.checkpoint_engine
    if not isinstance(writer, SafeCheckpointEngine):
        raise TypeError("save_checkpoint needs the engine from agvm_ds.initialize (SafeCheckpointEngine)")
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if _rank() == 0:
        # a tag written again is incomplete until its new marker exists
        (tag_dir / MARKER).unlink(missing_ok=True)
    writer.take_written()
    state = {**client_state, "step": step, "rng": rng_state()}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state)
    tag_dir.mkdir(parents=True, exist_ok=True)
    rng_file = tag_dir / f"rng_rank{_rank()}.pt"
    torch.save(rng_state(), rng_file)
    mine = {}
    extra_files = [str(p) for p in extra(tag_dir)] if extra is not None else []
    for p in [*writer.take_written(), str(rng_file), *extra_files]:
        rel = os.path.relpath(p, tag_dir)
        if not rel.startswith(".."):
            mine[rel] = {"size": os.path.getsize(p), "crc32": crc32_of(Path(p)), "rank": _rank()}
    every = collectives.gather_objects(mine, dst=0)  # rank 0 waits here for every rank's files
    if _rank() == 0:
        files = {}
        for part in every:
            for rel, entry in part.items():
                files.setdefault(rel, entry)
        record = {"format": MARKER_FORMAT, "step": step, "tag": tag,
                  **layout(collectives.world(), engine.zero_optimization_stage(),
                           engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()),
                  "files": dict(sorted(files.items()))}
        tmp = tag_dir / (MARKER + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(tag_dir / MARKER)
        if keep > 0:  # only now: the new tag is complete before any older one goes
            kept = {tag_dir.resolve(), *(Path(p).resolve() for p in protect)}
            for _, old in complete_tags(ckpt_dir)[:-keep]:
                if old.resolve() not in kept:
                    shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return tag_dir


# --------------------------------------------------------------------------- resuming
def _size_problem(tag_dir: Path) -> Optional[str]:
    """Why ``tag_dir`` is damaged by the cheap checks (marker, each file's size), or None."""
    try:
        files = read_marker(tag_dir).get("files", {})
    except CheckpointError as err:
        return str(err)
    for rel, entry in files.items():
        outside = member_problem(tag_dir, rel)  # never follow a name out of the tag (or to a device)
        if outside is not None and not outside.endswith(" is missing"):
            return f"{tag_dir / MARKER}: entry {outside}"
        path = tag_dir / rel
        try:
            size = path.stat().st_size
        except OSError:
            return f"{path}: missing"
        if size != entry.get("size"):
            return f"{path}: {size} bytes, the marker records {entry.get('size')} (truncated or damaged)"
    return None


def resolve_resume(resume: Optional[str], ckpt_dir: Path, skip: tuple = (),
                   warn: Callable[[str], None] = _warn) -> Optional[Path]:
    """The tag directory to load for ``--resume`` (``auto`` | a tag dir | a checkpoints dir).

    Rank-local and cheap (marker JSON, file sizes). ``auto`` takes the newest tag that passes,
    ``warn``-ing about each newer one it skips (and those in ``skip``); none at all means a
    fresh start (None), but only damaged ones is a :class:`CheckpointError`. An explicit
    path without a complete checkpoint is a :class:`ConfigError`, a damaged one a
    :class:`CheckpointError`.
    """
    if not resume:
        return None
    if resume == "auto":
        tags = complete_tags(ckpt_dir)
        for _, tag_dir in reversed(tags):
            if tag_dir in skip:
                continue
            problem = _size_problem(tag_dir)
            if problem is None:
                return tag_dir
            warn(f"--resume auto: skipping {tag_dir.name}: {problem}")
        if tags:
            raise CheckpointError(f"--resume auto: every checkpoint in {ckpt_dir} is damaged "
                                  f"(see the warnings); remove them or start without --resume")
        return None
    path = Path(resume)
    if (path / MARKER).is_file():
        tag_dir = path
    else:
        tags = complete_tags(path)
        if not tags:
            raise ConfigError(f"--resume {resume}: no complete checkpoint there "
                              f"(expected {MARKER} in a step_<N> folder)")
        tag_dir = tags[-1][1]
    problem = _size_problem(tag_dir)
    if problem is not None:
        raise CheckpointError(f"--resume {resume}: {problem}")
    return tag_dir


def check_resumable(tag_dir: Path, resume: str, expected: dict[str, int],
                    record: Optional[dict] = None) -> None:
    """Refuse ``tag_dir`` when its marker's layout (``record``, read when None) differs from
    ``expected`` (:func:`layout`)."""
    saved = read_marker(tag_dir) if record is None else record
    if any(k not in saved for k in LAYOUT_KEYS):
        return  # a marker from before layouts were recorded
    where = f"--resume {resume}" + (f" ({tag_dir.name})" if resume == "auto" else "")
    if saved["world_size"] != expected["world_size"]:
        from agvm_ds.train.elastic import refusal  # the elastic path (agvm_ds.train.elastic)

        problem = refusal(saved, expected)
        if problem is not None:
            raise CheckpointError(f"{where}: {problem}")
        return
    if saved["zero_stage"] != expected["zero_stage"]:
        raise CheckpointError(f"{where}: saved with ZeRO-{saved['zero_stage']}, this run uses "
                              f"ZeRO-{expected['zero_stage']}; changing the ZeRO stage on resume is "
                              f"not supported")
    if (saved["micro_batch"], saved["grad_accum"]) != (expected["micro_batch"], expected["grad_accum"]):
        raise CheckpointError(f"{where}: saved with micro batch {saved['micro_batch']} x "
                              f"{saved['grad_accum']} accumulation steps per rank, this run has "
                              f"{expected['micro_batch']} x {expected['grad_accum']}; resuming with a "
                              f"different batch layout is not supported yet")


def _verify_own_files(tag_dir: Path, record: dict) -> Optional[tuple[str, str]]:
    """(kind, message) of the first of this rank's files in the marker ``record`` that fails,
    or None.

    ``kind`` is ``"damaged"`` (checksum) or ``"refused"`` (intact, but not loadable with
    ``weights_only=True``).
    """
    for rel, entry in record.get("files", {}).items():
        # a file of an old rank this world lacks is checked by rank (old rank mod world)
        if entry.get("rank", 0) % collectives.world() != _rank():
            continue
        path = tag_dir / rel
        try:
            crc = crc32_of(path)
        except OSError as err:
            return "damaged", f"{path}: unreadable ({err.strerror})"
        if crc != entry.get("crc32"):
            return "damaged", f"{path}: checksum differs from the marker's (damaged)"
        try:
            # memory-mapped: the pickle is checked, the tensor bytes are not read again
            safe_load(path, map_location="cpu", mmap=zipfile.is_zipfile(path))
        except CheckpointError as err:
            return "refused", str(err)
    return None


def _agreed(value: Any) -> Any:
    """The first non-None of the ranks' ``value`` (rank order), on every rank."""
    every = collectives.gather_objects(value, dst=0)
    first = next((v for v in every if v is not None), None) if every is not None else None
    return collectives.broadcast_object(first, src=0)


def select_checkpoint(resume: Optional[str], ckpt_dir: Path, expected: dict[str, int]) -> Optional[Path]:
    """:func:`resolve_resume` + :func:`check_resumable` + every rank's checksum and
    weights_only check of its own files (collective; the same answer on every rank).

    Raises:
        CheckpointError: a refused ``--resume``, the same on every rank
            (``same_on_every_rank``, so the launcher prints it once).
    """
    if not resume:
        return None
    skip: list[Path] = []
    while True:
        choice = None
        if _rank() == 0:  # one rank decides, so that every rank verifies the same tag
            try:
                tag_dir = resolve_resume(resume, ckpt_dir, tuple(skip))
                choice = ("ok", (str(tag_dir), read_marker(tag_dir)) if tag_dir else None)
            except ConfigError as err:
                choice = ("error", str(err))
        kind, value = collectives.broadcast_object(choice, src=0)
        if kind == "error":
            raise CheckpointError(value, same_on_every_rank=True)
        if value is None:
            return None
        tag_dir, record = Path(value[0]), value[1]
        try:
            check_resumable(tag_dir, resume, expected, record)
        except CheckpointError as err:  # every rank judged the same record
            err.same_on_every_rank = True
            raise
        problem = _agreed(_verify_own_files(tag_dir, record))
        if problem is None:
            return tag_dir
        kind, msg = problem
        if resume != "auto" or kind == "refused":
            raise CheckpointError(f"--resume {resume}: {msg}", same_on_every_rank=True)
        if _rank() == 0:
            _warn(f"--resume auto: skipping {tag_dir.name}: {msg}")
        skip.append(tag_dir)


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
