"""The one reader of agvm-ds's JSON files: run files, model specs, and their overrides.

Everything that turns bytes on disk into a config dict goes through here, so a run file
and a model spec obey the same rules:

* :func:`read_json` — UTF-8 JSON whose top level is an object; every failure is a
  :class:`~agvm_ds.config.base.ConfigError` naming the file (and line:column for bad JSON).
* :func:`strip_comments` — any key starting with ``_`` (``"_comment"``, ``"_norm"`` …) is a
  comment, at any depth and inside lists, in agvm-ds's sections and in DeepSpeed's alike.
* :func:`set_dotted` — the one walker behind ``--override a.b.c=value`` (run files) and a
  model section's ``overrides`` (specs): missing objects are created, list items are
  addressed by index, and a scalar in the way is an error naming the path.
* :data:`DOTTED_MAPS` — objects whose keys are themselves dotted paths (``model.overrides``):
  ``--override model.overrides.head.num_convs=1`` sets the one key ``"head.num_convs"`` of
  that map and keeps its other keys (a walk into it would create ``{"head": {...}}``, which
  replaces the spec's whole ``head`` and drops the file's other head overrides).
* :data:`OWN_SECTIONS` — the top-level sections agvm-ds owns; everything else is DeepSpeed's.
* :data:`REPO_ROOT` — the checkout (for relative spec paths and the local caches).

A run file's ``_base_`` chain is merged by :mod:`agvm_ds.config.inherit` (on top of
:func:`read_json`): ``_base_`` and ``_delete_`` are the two ``_`` keys that are not comments.

Dataset annotation files are read by :mod:`agvm_ds.data.coco`, whose errors are
``DatasetError`` (a broken dataset, not a broken config).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agvm_ds.errors import ConfigError

__all__ = ["DOTTED_MAPS", "OWN_SECTIONS", "REPO_ROOT", "parse_override", "apply_override", "read_json",
           "set_dotted", "strip_comments"]

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Top-level sections of a run file that agvm-ds validates; they never reach DeepSpeed.
OWN_SECTIONS = ("agvm", "model", "data", "train")

#: paths (as key tuples) of the objects whose keys are dotted paths themselves
DOTTED_MAPS = (("model", "overrides"),)


def read_json(path: str | os.PathLike, what: str = "config file") -> dict:
    """The JSON object in ``path``; :class:`ConfigError` naming the file on any failure."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return data


def strip_comments(node: Any) -> Any:
    """A copy of ``node`` without the keys that start with ``_``, at any depth."""
    if isinstance(node, dict):
        return {k: strip_comments(v) for k, v in node.items()
                if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(node, list):
        return [strip_comments(v) for v in node]
    return node


def _index(node: list, part: str) -> int | None:
    if part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
        return int(part)
    return None


def set_dotted(node: Any, parts: list[str], value: Any, where: str) -> None:
    """Set ``node[parts[0]]…[parts[-1]] = value`` in place; ``where`` prefixes errors."""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            continue
        idx = _index(node, part) if isinstance(node, list) else None
        if idx is None:
            parent = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"{where}: {parent} is not an object")
        if last:
            node[idx] = value
        else:
            node = node[idx]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=1e-3"`` → (``["a", "b", "c"]``, ``0.001``). Unparseable JSON stays a str."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--override {text!r}: expected key.path=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.split("."), value


def apply_override(config: dict, text: str) -> None:
    """Apply one ``--override key.path=value`` to ``config`` in place."""
    parts, value = parse_override(text)
    for prefix in DOTTED_MAPS:
        n = len(prefix)
        if tuple(parts[:n]) == prefix and len(parts) > n + 1:
            parts = [*parts[:n], ".".join(parts[n:])]  # one key of the map, not a walk into it
    set_dotted(config, parts, value, f"--override {text!r}")
