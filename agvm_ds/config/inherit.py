"""Run-file inheritance: ``"_base_"`` names the files a run file is a delta of.

A run file may start from other run files instead of repeating them::

    {"_base_": "faster_rcnn_r50_fpn_sgd_bs256.json",
     "train_batch_size": 512,
     "train": {"max_steps": 3680, "warmup_steps": 458}}

:func:`read_run_file` reads such a file and returns the resolved dict — what the file would
hold written out in full — which is all that the checks, DeepSpeed, ``config.json`` and a
resume ever see. The rules, mmengine's ``Config`` conventions for JSON files:

* ``"_base_"``: one path or a list of paths, relative to the file that names them (or
  absolute), only at the top level. A list is merged in order, each base over the ones
  before it, the file itself last (mmengine refuses a key that two bases both set; here the
  later base wins, as ``--override`` after ``--override`` does).
* Merging: objects are merged key by key, recursively; lists and scalars (``null``
  included) replace what the base holds; an object over a base's scalar or list replaces it.
* ``"_delete_": true`` inside an object: that object replaces the base's object instead of
  being merged into it (how a delta drops keys: ``"optimizer": {"_delete_": true, "type":
  "AdamW", ...}`` leaves nothing of the base's SGD ``momentum``). In a list of bases, what a
  later base marks so replaces what the bases before it hold there, too.
* Bases are ``.json`` run files, read as JSON and never executed (mmengine's ``.py``
  bases are refused with that reason), each resolved the same way (a chain of bases).
* A cycle is refused in one line naming the chain; a base that does not exist in one line
  naming the file that names it.

``_base_`` and ``_delete_`` never survive resolution; other ``_`` keys stay (comments, which
the run-file reader drops later, :func:`agvm_ds.config.files.strip_comments`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from agvm_ds.config.files import read_json
from agvm_ds.errors import ConfigError

__all__ = ["BASE_KEY", "DELETE_KEY", "merge_over", "read_run_file", "unmarked"]

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"


def read_run_file(path: str | os.PathLike) -> dict:
    """The run file at ``path`` with its ``_base_`` chain resolved (a new dict, comments kept,
    no ``_base_`` / ``_delete_`` left); :class:`ConfigError` in one line on any mistake."""
    return unmarked(_resolve(Path(path), ()))


def _shown(path: Path) -> str:
    return os.path.normpath(path)


def _resolve(path: Path, chain: tuple[Path, ...]) -> dict:
    """``path`` resolved; ``chain``: the files that led here, the first one named by the user."""
    real = path.resolve()
    if any(real == link.resolve() for link in chain):
        links = " -> ".join(_shown(p) for p in (*chain, path))
        raise ConfigError(f"{_shown(chain[0])}: _base_ cycle: {links}")
    data = read_json(path) if not chain else read_json(path, what="base config file")
    where = _shown(path)
    if DELETE_KEY in data:
        raise ConfigError(f"{where}: _delete_ at the top level replaces nothing; to start from no base, "
                          f"leave out _base_")
    names = data.pop(BASE_KEY, None)
    _refuse_nested_base(data, where, "")
    if names is None:
        return _marked(data, where, "")
    merged: dict = {}
    for name in _base_names(names, where):
        merged = merge_over(merged, _resolve(_base_path(path, name, where), (*chain, path)), where)
    return merge_over(merged, data, where)


def _base_names(names: Any, where: str) -> list[str]:
    listed = names if isinstance(names, list) else [names]
    if not listed or not all(isinstance(n, str) and n.strip() for n in listed):
        raise ConfigError(f"{where}: _base_: expected a file name or a non-empty list of file names, "
                          f"got {names!r}")
    return listed


def _base_path(path: Path, name: str, where: str) -> Path:
    """The file ``name`` (as ``path`` writes it) points to: relative to ``path``'s folder."""
    if not name.endswith(".json"):
        raise ConfigError(f"{where}: _base_ {name!r}: a base must be a .json run file (bases are read as "
                          f"JSON, never executed)")
    target = Path(name).expanduser()
    target = target if target.is_absolute() else path.parent / target
    if not target.is_file():
        raise ConfigError(f"{where}: _base_ {name!r}: no such file ({_shown(target)})")
    return target


def _refuse_nested_base(node: Any, where: str, dotted: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            inner = f"{dotted}.{key}" if dotted else str(key)
            if key == BASE_KEY and dotted:
                raise ConfigError(f"{where}: {inner}: only the top level of a run file names bases")
            _refuse_nested_base(value, where, inner)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _refuse_nested_base(value, where, f"{dotted}.{i}")


def _delete_flag(node: dict, where: str, dotted: str) -> bool:
    flag = node.get(DELETE_KEY, False)
    if not isinstance(flag, bool):
        raise ConfigError(f"{where}: {dotted}._delete_: must be true or false, got {flag!r}")
    return flag


def _marked(node: Any, where: str, dotted: str) -> Any:
    """``node`` with every ``_delete_`` checked (true or false) and only the true ones kept:
    a file's resolved form keeps them, so that in a list of bases an object a later base
    marks replaces what the bases before it hold (:func:`read_run_file` drops them last)."""
    if isinstance(node, dict):
        keep = _delete_flag(node, where, dotted) if dotted else False
        out = {k: _marked(v, where, f"{dotted}.{k}" if dotted else str(k))
               for k, v in node.items() if k != DELETE_KEY}
        return {DELETE_KEY: True, **out} if keep else out
    if isinstance(node, list):
        return [_marked(v, where, f"{dotted}.{i}") for i, v in enumerate(node)]
    return node


def unmarked(node: Any) -> Any:
    """A copy of ``node`` without ``_delete_`` keys (a resolved file as the checks read it)."""
    if isinstance(node, dict):
        return {k: unmarked(v) for k, v in node.items() if k != DELETE_KEY}
    if isinstance(node, list):
        return [unmarked(v) for v in node]
    return node


def merge_over(base: dict, child: dict, where: str, dotted: str = "") -> dict:
    """``child`` over ``base``, a new dict: objects merged key by key (unless the child's object
    says ``"_delete_": true``: then it replaces the base's), anything else replaced. ``where``
    (the child's file) and ``dotted`` (the path so far) name a bad ``_delete_``. The result
    keeps the true ``_delete_`` marks (see :func:`_marked`); ``unmarked`` removes them."""
    out = dict(base)
    for key, value in child.items():
        inner = f"{dotted}.{key}" if dotted else str(key)
        if isinstance(value, dict) and isinstance(base.get(key), dict) and not _delete_flag(value, where, inner):
            out[key] = merge_over(base[key], {k: v for k, v in value.items() if k != DELETE_KEY}, where, inner)
        else:
            out[key] = _marked(value, where, inner)
    return out
