"""Verify what is read after training: a checkpoint against its completion marker, and the
file names that any file (a marker, an export's ``config.json``) points to.

Training's ``--resume`` (:mod:`agvm_ds.train.checkpoint`) checks a tag's marker — every
listed file present with the recorded size and CRC-32 — before it loads anything;
evaluate, export, predict and :func:`~agvm_ds.inference.load_model` run the same checks
here, with the same one-line messages naming the file. A ``step_<N>`` folder without a
marker (a save that never finished, or files copied by hand) is refused unless the caller
opts out (``--no-verify``, ``verify=False``). A marker written before the manifest existed
(no ``files``) is trusted, as ``--resume`` trusts it.

A name read from a file is a relative path that stays inside that file's folder and names
a regular file: not ``../../x``, not an absolute path, not a symlink out of the folder,
not a device or a FIFO (reading ``/dev/zero`` for its checksum would never end).
"""

from __future__ import annotations

import json
import os
import stat
import zlib
from pathlib import Path
from typing import Any, Optional

from agvm_ds.errors import CheckpointError

MARKER = "agvm_ds_complete.json"
_CHUNK = 1 << 22
NO_VERIFY_HINT = "pass --no-verify (load_model: verify=False) to read it unverified"


def crc32_of(path: Path) -> int:
    """CRC-32 of a file's bytes, read in 4 MiB chunks (as the marker's writer computes it)."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def member_problem(folder: Path, name: Any) -> Optional[str]:
    """Why ``name`` (read from a file in ``folder``) may not be opened, or None: it must be a
    relative path inside ``folder`` naming an existing regular file."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return f"{name!r} is not a file name"
    if os.path.isabs(name) or ".." in Path(name).parts:
        return f"{name!r} points outside {folder}"
    path = folder / name
    try:
        real, root = path.resolve(strict=True), folder.resolve(strict=True)
    except (OSError, RuntimeError):
        return f"{name!r}: {path} is missing"  # a dangling link too
    if not real.is_relative_to(root):
        return f"{name!r} points outside {folder} (a link to {real})"
    if not stat.S_ISREG(real.stat().st_mode):
        return f"{name!r}: {path} is not a regular file"
    return None


def member_path(folder: Path, name: Any, source: Path, error: type = CheckpointError) -> Path:
    """``folder / name`` for a ``name`` read from the file ``source``; ``error`` (one line
    naming ``source``) when :func:`member_problem` finds one."""
    problem = member_problem(folder, name)
    if problem is not None:
        if problem.endswith(" is missing") and not os.path.lexists(folder / name):
            raise error(f"{folder / name}: missing (listed in {source})")
        raise error(f"{source}: entry {problem}")
    return folder / name


def read_marker(tag_dir: Path) -> dict:
    """The marker of ``tag_dir`` as a JSON object whose ``files`` (if any) map names to
    objects; :class:`CheckpointError` naming the marker otherwise."""
    path = tag_dir / MARKER
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: invalid completion marker ({type(err).__name__})") from None
    files = record.get("files", {}) if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
        raise CheckpointError(f"{path}: invalid completion marker (not the expected JSON object)")
    return record


def verify_checkpoint(tag_dir: Path, verify: bool = True) -> Optional[dict]:
    """Check ``tag_dir`` against its marker: every listed file inside the folder, a regular
    file of the recorded size and CRC-32. Returns the marker (None when not verifying).

    Raises:
        CheckpointError: one line naming the marker or the first file that fails.
    """
    if not verify:
        return None
    marker = tag_dir / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{marker}: missing, so the checkpoint's files cannot be verified "
                              f"(a save that did not finish leaves none); {NO_VERIFY_HINT}")
    record = read_marker(tag_dir)
    entries = record.get("files", {})
    paths = {rel: member_path(tag_dir, rel, marker) for rel in entries}  # names first, then bytes
    for rel, entry in entries.items():
        size = paths[rel].stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(f"{paths[rel]}: {size} bytes, the marker records "
                                  f"{entry.get('size')} (truncated or damaged)")
    for rel, entry in entries.items():
        if crc32_of(paths[rel]) != entry.get("crc32"):
            raise CheckpointError(f"{paths[rel]}: checksum differs from the marker's (damaged)")
    return record


def check_listed(path: Path, record: Optional[dict]) -> None:
    """Refuse reading ``path`` of a verified checkpoint whose marker lists files but not it
    (a file added after the save was never checked)."""
    if record is None or "files" not in record:
        return
    if path.name not in record["files"]:
        raise CheckpointError(f"{path}: not listed in {path.parent / MARKER}, so it was never "
                              f"verified; {NO_VERIFY_HINT}")
