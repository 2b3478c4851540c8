"""Every listed image file is an image, checked before training: its header only, cached.

A file that is not an image (or not the size its annotations declare) would otherwise be
found only when a data loader first decodes it, mid-training, on one rank — whose one-line
error then races the other ranks' collective tracebacks. :func:`check_headers` opens every
file with PIL, which parses the header (format, size) without decoding the pixels (COCO
val2017's 5000 JPEGs: well under a second from the page cache), and raises a
:class:`~agvm_ds.data.errors.DatasetError` naming the first bad file and how many are bad.

The files that passed are remembered in a small JSON file per image folder under the
cache dir (key: name, byte size and modification time), so a later run re-opens only new
or changed files. Pixel data is not verified here: a file truncated after a valid header
still fails when it is decoded (one ``error:`` line from that rank).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Optional

from PIL import Image

from agvm_ds.data.errors import DatasetError

__all__ = ["check_headers"]

_FORMAT = 1


def _cache_file(cache_dir: Path, folder: Path) -> Path:
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"headers-{key}.json"


def _load(path: Optional[Path]) -> dict:
    if path is None:
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc.get("files", {}) if isinstance(doc, dict) and doc.get("format") == _FORMAT else {}


def _save(path: Optional[Path], folder: Path, files: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": _FORMAT, "folder": str(folder), "files": files}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next run the same check again


def check_headers(folder: Path, files: Iterable[tuple[str, Optional[tuple[int, int]]]], what: str,
                  cache_dir: Optional[Path] = None) -> None:
    """Open the header of every ``(file name, expected (width, height) or None)`` in
    ``folder``; :class:`DatasetError` on the first file that is missing, not an image, or
    not of the expected size (the count of bad files in the message). ``what`` names the
    listing (the annotation file) in the message; ``cache_dir`` None: no cache."""
    cache_path = _cache_file(cache_dir, folder) if cache_dir is not None else None
    known = _load(cache_path)
    passed: dict[str, list] = {}
    bad: list[str] = []
    for name, size in files:
        path = folder / name
        try:
            st = path.stat()
        except OSError:
            bad.append(f"{path}: image file not found (listed in {what})")
            continue
        key = [st.st_size, st.st_mtime_ns, list(size) if size else None]
        if known.get(name) == key:
            passed[name] = key
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning and the like
                with Image.open(path) as im:
                    got = im.size
        except Image.DecompressionBombError as err:  # not an OSError: PIL raises it from open()
            bad.append(f"{path}: refused, too many pixels ({err}) (listed in {what})")
            continue
        except OSError as err:  # PIL.UnidentifiedImageError is an OSError
            why = "not an image PIL can read" if type(err).__name__ == "UnidentifiedImageError" else str(err)
            bad.append(f"{path}: {why} (listed in {what})")
            continue
        if size is not None and tuple(got) != tuple(size):
            bad.append(f"{path}: image is {got[0]}x{got[1]} but {what} says {size[0]}x{size[1]}")
            continue
        passed[name] = key
    if len(passed) != len(known) or any(known.get(k) != v for k, v in passed.items()):
        _save(cache_path, folder, {**known, **passed})
    if bad:
        more = f" ({len(bad)} bad image files in all)" if len(bad) > 1 else ""
        raise DatasetError(bad[0] + more)
