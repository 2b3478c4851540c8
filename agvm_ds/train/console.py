"""The rank processes' console: agvm-ds's own lines on the terminal, everything else in a log.

A training rank prints its own ``[agvm-ds] …`` lines, ``error: …`` / ``warning: …`` lines
and the progress bar; DeepSpeed, torch and the libraries below them add warnings that
repeat per rank and break the progress bar's line. :class:`RankConsole` (installed by
``launch/train.py`` at process start, before anything imports DeepSpeed) sends those to
``<output dir>/log_rank<N>.txt`` instead, as they were written:

* Python ``warnings`` (torch's ``FutureWarning`` s, C++ ``TORCH_WARN`` raised while Python
  calls into torch) through a ``warnings.showwarning`` hook;
* DeepSpeed's logger (``"DeepSpeed"``, which writes to stdout with its own handler and does
  not propagate) through a logger filter that hands each record to the log and drops it
  from the console; the filter is in place before DeepSpeed creates its handler, so even
  its import-time messages (the CPU-accelerator warning) are caught;
* other libraries' ``logging`` records through a handler on the root logger;
* ``sys.stdout`` through :class:`LineRouter`: whole lines starting with ``[agvm-ds]``,
  ``error:`` or ``warning:`` go to the terminal, every other line (a library's ``print``)
  to the log;
* once the log is open, file descriptors 1 and 2 themselves point at it, so C++ logging
  (c10 / gloo ``[W…]`` lines) and child processes' output land there too, while Python's
  ``sys.stdout`` / ``sys.stderr`` keep writing to the terminal through duplicates of the
  original descriptors. Tracebacks and ``sys.stderr`` writes (the progress bar, our
  ``error:`` lines) therefore still reach the terminal.

The output dir is known only after the run file is read, which itself imports DeepSpeed:
until :meth:`RankConsole.attach` opens the file, filtered text waits in memory. A run
refused before that (a bad run file: one ``error:`` line, exit 2) drops it; any other
failure before it prints it to stderr so nothing that explains a crash is lost.

``--verbose`` or ``AGVM_DS_VERBOSE=1`` keeps everything on the console (nothing installed).

Limitations:
    Warnings raised while ``agvm_ds`` itself is imported (torch's import) come before the
    hook and stay on the console. A process killed by a C++ abort writes its message
    through descriptor 2, i.e. into the log file only; the launcher still reports the exit.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional, TextIO

__all__ = ["LOG_NAME", "OWN_PREFIXES", "VERBOSE_ENV", "LineRouter", "RankConsole", "verbose_requested"]

#: the per-rank log file in the output dir
LOG_NAME = "log_rank{rank}.txt"
#: the lines of stdout that are agvm-ds's own
OWN_PREFIXES = ("[agvm-ds]", "error:", "warning:")
VERBOSE_ENV = "AGVM_DS_VERBOSE"
#: DeepSpeed's own line format (deepspeed.utils.logging), so its lines read the same in the log
_DEEPSPEED_FORMAT = "[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d:%(funcName)s] %(message)s"


def verbose_requested(flag: bool = False, environ: Optional[dict] = None) -> bool:
    """True when ``--verbose`` was given or ``AGVM_DS_VERBOSE`` is set to anything but 0/empty."""
    value = (os.environ if environ is None else environ).get(VERBOSE_ENV, "").strip().lower()
    return flag or value not in ("", "0", "false", "no", "off")


class _Sink:
    """The log: text is held in memory until :meth:`open` gives it a file."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.fh: Optional[TextIO] = None

    def write(self, text: str) -> int:
        if self.fh is None:
            self.pending.append(text)
        else:
            self.fh.write(text)
        return len(text)

    def flush(self) -> None:
        if self.fh is not None:
            self.fh.flush()

    def open(self, path: Path) -> None:
        # append: a resumed run keeps the earlier runs' lines; line-buffered so that a rank
        # that dies leaves its last lines behind
        self.fh = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
        self.fh.write("".join(self.pending))
        self.pending = []


class LineRouter(io.TextIOBase):
    """A ``sys.stdout`` that routes whole lines: those starting with one of ``prefixes`` to
    ``console``, all others to ``log``. A line's destination is decided from its first
    characters (as soon as they can no longer become one of the prefixes), so a line
    written in pieces is never split between the two."""

    def __init__(self, console: TextIO, log, prefixes: tuple[str, ...] = OWN_PREFIXES):
        super().__init__()
        self.console, self.log, self.prefixes = console, log, prefixes
        self._dest = None  # where the current, unfinished line goes (None: not decided yet)
        self._head = ""  # the current line's text while undecided

    def _decide(self, head: str, complete: bool):
        if head.startswith(self.prefixes):
            return self.console
        if complete or not any(p.startswith(head) for p in self.prefixes):
            return self.log
        return None

    def write(self, text: str) -> int:
        rest = text
        while rest:
            cut = rest.find("\n") + 1  # 0: no newline in what is left
            piece, rest = (rest[:cut], rest[cut:]) if cut else (rest, "")
            if self._dest is None:
                head = self._head + piece
                dest = self._decide(head, complete=bool(cut))
                if dest is None:
                    self._head = head
                    continue
                self._head, self._dest, piece = "", dest, head
            self._dest.write(piece)
            if cut:
                if self._dest is self.console:
                    self.console.flush()  # our lines appear when printed, between bar redraws
                self._dest = None
        return len(text)

    def flush(self) -> None:
        # an undecided start of a line stays until its line is complete or decidable
        self.console.flush()
        self.log.flush()

    def finish(self) -> None:
        """End of output: an undecided start of a line can only be someone else's text."""
        if self._head:
            self.log.write(self._head)
            self._head = ""
        self.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.console, "encoding", "utf-8")


class _ToLog(logging.Filter):
    """Logger filter: hands each record to the log handler and keeps it off the logger's own
    handlers (DeepSpeed's console handler)."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        self.handler.handle(record)
        return False


class _StderrHandler(logging.Handler):
    """agvm-ds's own warnings as ``warning: …`` lines on whatever ``sys.stderr`` is now."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"{record.levelname.lower()}: {record.getMessage()}\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never take the job down
            self.handleError(record)


class RankConsole:
    """One rank's console filter; :meth:`install` it first thing, :meth:`attach` it to the
    output dir once that is known, :meth:`close` it at exit."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")
        self.sink = _Sink()
        self.path: Optional[Path] = None
        self.router: Optional[LineRouter] = None
        self._saved: dict = {}

    @classmethod
    def install(cls, rank: Optional[int] = None) -> "RankConsole":
        """Start filtering this process's console (``rank`` default: ``$RANK`` or 0)."""
        self = cls(int(os.environ.get("RANK", "0")) if rank is None else rank)
        self._saved = {"stdout": sys.stdout, "showwarning": warnings.showwarning}
        warnings.showwarning = self._showwarning

        to_log = logging.StreamHandler(self.sink)
        to_log.setFormatter(logging.Formatter(_DEEPSPEED_FORMAT))
        # getLogger creates DeepSpeed's logger now if it is not imported yet; DeepSpeed later
        # sets its level and adds its handler but keeps this filter
        logging.getLogger("DeepSpeed").addFilter(_ToLog(to_log))
        root_log = logging.StreamHandler(self.sink)
        root_log.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] %(name)s: %(message)s"))
        logging.getLogger().addHandler(root_log)
        # agvm-ds's own records: warnings and errors on the console, all of it in the log
        own = logging.getLogger("agvm_ds")
        own.setLevel(logging.INFO)
        own.propagate = False
        console = _StderrHandler(logging.WARNING)
        own.addHandler(console)
        own_log = logging.StreamHandler(self.sink)
        own_log.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] %(name)s: %(message)s"))
        own.addHandler(own_log)

        self.router = LineRouter(sys.stdout, self.sink)
        sys.stdout = self.router
        return self

    def _showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        (file if file is not None else self.sink).write(text)

    def attach(self, out_dir: Path) -> Path:
        """Open ``out_dir/log_rank<N>.txt``, write what waited, and point descriptors 1 and 2
        at it (the terminal stays reachable through ``sys.stdout`` / ``sys.stderr``)."""
        if self.path is not None:
            return self.path
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / LOG_NAME.format(rank=self.rank)
        sys.stdout.flush()
        sys.stderr.flush()
        self.sink.pending.insert(0, f"===== agvm-ds rank {self.rank}, pid {os.getpid()}, "
                                    f"started {self.started}: {' '.join(sys.argv)}\n")
        self.sink.open(self.path)
        terminal = {}
        for fd, name in ((1, "stdout"), (2, "stderr")):
            stream = getattr(sys, name) if name == "stderr" else self._saved["stdout"]
            try:
                copy = os.dup(fd)
            except OSError:  # no such descriptor (a detached process): leave this one alone
                continue
            terminal[name] = open(copy, "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                                  errors="backslashreplace", closefd=True)
            os.dup2(self.sink.fh.fileno(), fd)
        if "stdout" in terminal:
            self.router.console = terminal["stdout"]
        if "stderr" in terminal:
            sys.stderr = terminal["stderr"]
        return self.path

    def log_exception(self) -> None:
        """Write the exception being handled to the log as well (the terminal gets it from
        the interpreter). Before :meth:`attach` there is no log: :meth:`close` shows what
        waited instead, and the traceback is not repeated."""
        if self.sink.fh is not None:
            self.sink.write(traceback.format_exc())

    def close(self, failed: bool = False) -> None:
        """Flush everything; after a failure before :meth:`attach`, show what waited."""
        if self.router is not None:
            self.router.finish()
        if self.sink.fh is None:
            if failed and self.sink.pending:
                sys.stderr.write("".join(self.sink.pending))
            self.sink.pending = []
        self.sink.flush()
        sys.stderr.flush()
