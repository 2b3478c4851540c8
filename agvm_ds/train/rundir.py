"""One run per output folder: a lock, no fresh start over a used folder, ``--fresh``.

:func:`claim_run_folder` (collective; rank 0 touches the file system, every rank gets the
same verdict) runs before anything is written into the folder:

* **Lock.** Rank 0 holds ``DIR/agvm_ds.lock`` (``fcntl.flock`` on an open descriptor, so
  the kernel drops it when the process dies) for the whole run; the file records pid, host,
  the process's start time and the command. A second writer is refused in one line naming
  the holder. A lock file whose holder is gone (the flock is free, and the recorded pid is
  not running on this host, or is another process now) is taken over with one
  ``warning:`` line. Where flock is not enforced (some network file systems) a lock file
  naming a live pid on this host still refuses. :meth:`RunFolder.release` removes it.
* **Used folder.** A folder that holds a run (:data:`RUN_FILES`) is refused for a fresh
  start unless the launcher was given ``--resume`` (continue it), another ``--output_dir``,
  or ``--fresh``: everything in it except the lock and earlier ``previous_<time>/`` folders
  moves, unchanged, into one new ``DIR/previous_<time>/``, which keeps a run's layout
  (``config.json`` two levels above ``checkpoints/step_<N>``), so evaluate, export and
  ``--resume PATH`` still read it. A folder that holds other files but no run is refused
  even with ``--fresh`` (nothing that is not a run is ever moved); log files alone
  (``log_rank<N>.txt`` of a run refused early) do not make a folder used.

Limitations:
    The lock is advisory: it keeps agvm-ds launchers apart, not other programs. On a file
    system without flock, a holder on another host that died leaves a lock only a person
    can judge: it is taken over (the flock is free), as a dead holder on this host is.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from agvm_ds import collectives
from agvm_ds.errors import ConfigError

__all__ = ["LOCK_NAME", "PREVIOUS_PREFIX", "RUN_FILES", "FolderLock", "RunFolder", "acquire_lock",
           "claim_run_folder", "folder_state", "move_previous_run"]

LOCK_NAME = "agvm_ds.lock"
#: folders of earlier runs moved aside by --fresh
PREVIOUS_PREFIX = "previous_"
#: what a run writes into its folder (any of them present: the folder holds a run)
RUN_FILES = ("config.json", "metrics.jsonl", "eval_history.jsonl", "eval.json", "checkpoints",
             "agvm_modulation.png", "monitor", "evaluate")


def _proc_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat``),
    None where unreadable: with the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in parentheses may hold spaces


def _running(pid: int, start: Optional[str]) -> bool:
    """Whether the process the lock names still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        pass
    now = _proc_start(pid)
    return start is None or now is None or now == start


def _holder(record: dict) -> str:
    return (f"pid {record.get('pid', '?')} on {record.get('host', '?')}, started "
            f"{record.get('started', '?')}")


@dataclass
class FolderLock:
    """A held ``agvm_ds.lock``: the open descriptor carrying the flock."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:  # still ours
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def acquire_lock(out_dir: Path, warn=None) -> FolderLock:
    """Take ``out_dir/agvm_ds.lock`` for this process (rank-local).

    Raises:
        ConfigError: another live process holds it (one line naming it and the file).
    """
    import fcntl

    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
    path = out_dir / LOCK_NAME
    host = socket.gethostname()
    for _ in range(10):  # a holder that releases between our open and our flock: try again
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _read_record(fd)
            os.close(fd)
            raise ConfigError(f"{out_dir} is in use by another run ({_holder(record)}; lock file {path}): "
                              f"wait for it to end, or choose another --output_dir") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file after we opened it: the lock is elsewhere now
            os.close(fd)
            continue
        record = _read_record(fd)
        if record:
            pid = record.get("pid")
            alive = (record.get("host") == host and isinstance(pid, int)
                     and (pid == os.getpid() or _running(pid, record.get("pid_start"))))
            if alive:  # flock not enforced here, but the holder runs
                os.close(fd)
                raise ConfigError(f"{out_dir} is in use by another run ({_holder(record)}; lock file {path}): "
                                  f"wait for it to end, or choose another --output_dir")
            warn(f"{path}: the run that held it ({_holder(record)}) is no longer running; "
                 f"this run takes the folder over")
        mine = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "pid_start": _proc_start(os.getpid()), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        return FolderLock(path, fd)
    raise ConfigError(f"{path}: could not take the lock (it changed hands 10 times); try again")


def _read_record(fd: int) -> dict:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        record = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"pid": "?", "host": "?", "started": "? (unreadable lock file)"}
    return record if isinstance(record, dict) else {}


def folder_state(out_dir: Path) -> tuple[list[str], list[str]]:
    """(run files, other entries) in ``out_dir``: the lock, log files and ``previous_*``
    folders are neither. An empty ``checkpoints/`` does not count as a run file."""
    run, other = [], []
    if not out_dir.is_dir():
        return run, other
    for entry in sorted(out_dir.iterdir()):
        name = entry.name
        if name in (LOCK_NAME,) or name.startswith(PREVIOUS_PREFIX) or (
                name.startswith("log_rank") and name.endswith(".txt")):
            continue
        if name in RUN_FILES:
            if not (entry.is_dir() and not any(entry.iterdir())):
                run.append(name)
        else:
            other.append(name)
    return run, other


def new_stamped_folder(parent: Path, prefix: str, stamp: Optional[str] = None) -> Path:
    """Create and return ``parent/<prefix><stamp>`` (stamp: the local time), with ``-2``,
    ``-3``, ... appended when a folder of that name exists: what is moved aside never lands
    in, or merges with, an earlier move's folder."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    dest, n = parent / f"{prefix}{stamp}", 1
    while dest.exists():
        n += 1
        dest = parent / f"{prefix}{stamp}-{n}"
    dest.mkdir(parents=True)
    return dest


def move_previous_run(out_dir: Path, stamp: Optional[str] = None) -> tuple[Path, list[str]]:
    """Move everything in ``out_dir`` but the lock and earlier ``previous_*`` folders into
    a new ``out_dir/previous_<stamp>/``; return it and the names moved."""
    dest = new_stamped_folder(out_dir, PREVIOUS_PREFIX, stamp)
    moved = []
    for entry in sorted(out_dir.iterdir()):
        if entry.name == LOCK_NAME or entry.name.startswith(PREVIOUS_PREFIX):
            continue
        os.replace(entry, dest / entry.name)
        moved.append(entry.name)
    return dest, moved


@dataclass
class RunFolder:
    """An output folder this job holds (rank 0 holds the lock; the others hold nothing)."""

    out_dir: Path
    lock: Optional[FolderLock] = None
    #: where ``--fresh`` moved the previous run (None: nothing was moved)
    previous: Optional[Path] = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _claim_on_rank0(out_dir: Path, resume: Optional[str], fresh: bool, refuse_used: bool) -> RunFolder:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output_dir {out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out_dir)
    try:
        folder = RunFolder(out_dir, lock)
        run_files, other = folder_state(out_dir)
        if refuse_used and other and not run_files:
            raise ConfigError(f"--output_dir {out_dir}: holds files that are not an agvm-ds run "
                              f"({', '.join(other[:3])}{', …' if len(other) > 3 else ''}); "
                              f"choose an empty or a new folder")
        if refuse_used and not resume:
            if run_files and not fresh:
                raise ConfigError(f"--output_dir {out_dir}: holds a run ({', '.join(run_files)}); "
                                  f"continue it with --resume auto, start this one in another "
                                  f"--output_dir, or give --fresh to move the previous run into "
                                  f"{out_dir}/{PREVIOUS_PREFIX}<time>/ first")
            if run_files:
                folder.previous, moved = move_previous_run(out_dir)
                print(f"[agvm-ds] --fresh: the previous run in {out_dir} ({', '.join(moved)}) moved to "
                      f"{folder.previous}/", flush=True)
        return folder
    except BaseException:
        lock.release()
        raise


def claim_run_folder(out_dir: Path, resume: Optional[str], rank: int, *, fresh: bool = False,
                     refuse_used: bool = False) -> RunFolder:
    """Lock ``out_dir`` for this job and, with ``refuse_used`` (the launcher), refuse a
    fresh start in a used folder unless ``fresh`` moves the previous run aside first.
    Collective: every rank returns a :class:`RunFolder` or raises the same
    :class:`ConfigError` (``same_on_every_rank``)."""
    folder, verdict = None, None
    if rank == 0:
        try:
            folder = _claim_on_rank0(out_dir, resume, fresh, refuse_used)
            verdict = ("ok", str(folder.previous) if folder.previous else None)
        except ConfigError as err:
            verdict = ("error", str(err))
        except OSError as err:  # an unwritable folder: the same one line, not a hang of the others
            verdict = ("error", f"--output_dir {out_dir}: {err.strerror or err}"
                                + (f" ({err.filename})" if err.filename else ""))
    kind, value = collectives.broadcast_object(verdict, src=0)
    if kind == "error":
        err = ConfigError(value)
        err.same_on_every_rank = True
        raise err
    return folder if folder is not None else RunFolder(out_dir, previous=Path(value) if value else None)
