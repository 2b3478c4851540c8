"""Reading a ``backbone.checkpoint`` file: tensors only, or one line naming the file.

``torch.load(weights_only=True)`` never runs what a pickle asks for, but refuses it with a
six-line ``UnpicklingError`` (and a file that is no checkpoint at all with a bare
``KeyError``); a user who pointed ``backbone.checkpoint`` at the wrong file gets one
``ConfigError`` line instead, naming the key, the file and the global it asked for.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from agvm_ds.errors import ConfigError

_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def read_weights_file(path: Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``mmap``: map the tensors instead
    of reading them (a check of what the file asks to unpickle; zip-format files only,
    others are read whole).

    Raises:
        ConfigError: ``backbone.checkpoint: <path>: refused to load (...)``, one line.
    """
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it does not expect
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as err:  # mmap of a legacy (non-zip) file: read it whole
                if not mmap or "zipfile" not in str(err):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure is a refusal; nothing in it ran
        raise ConfigError(f"backbone.checkpoint: {path}: refused to load ({_why(err)})") from None


def _why(err: Exception) -> str:
    """torch's several-paragraph refusal, as the one fact that matters."""
    text = str(err)
    found = _GLOBAL.search(text)
    if found:
        return f"it asks to unpickle {found.group(1)}, which is not allowed: only tensors are read"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = lines[0] if lines else ""
    for k, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and k + 1 < len(lines):
            detail = lines[k + 1]
    return f"not a PyTorch weights file: {type(err).__name__}: {detail}"
