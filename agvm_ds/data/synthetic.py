"""The embedded benchmark: a seeded shapes dataset written in the real COCO layout.

Why it exists: tests, the quickstart and CI need a detection / instance / semantic dataset
that needs no download, yet is hard enough that model size, batch size and training length
move the AP. Six shape classes (circle, square, triangle, star, ring, cross) with random
colour, size, stretch, rotation, partial occlusion and a cluttered background.

Layout written under ``DIR`` (the same one :class:`agvm_ds.data.coco.CocoDataset` reads
for real COCO)::

    DIR/annotations/instances_train.json     COCO detection + instance annotations
    DIR/annotations/instances_val.json
    DIR/annotations/semantic_classes.json    ["background", "circle", ...]
    DIR/train/000000000001.png ...           RGB images (PNG: bytes are deterministic)
    DIR/val/...
    DIR/semantic/train/000000000001.png ...  uint8 label maps: 0 background, k+1 shape k
    DIR/semantic/val/...

Masks are stored the three ways COCO files do: polygons for objects that are whole and
unoccluded, compressed RLE (``counts`` a str) or uncompressed RLE (``counts`` a list) for
rings, truncated and occluded objects. Category ids are deliberately non-contiguous (as in
COCO) so the contiguous-label ↔ category-id mapping is always exercised.

Every image comes from its own generator seeded by ``(seed, split, index)``: the same seed
gives the same bytes, whatever the number of worker processes.

CLI: ``python -m agvm_ds.data.synthetic --out DIR [--train N] [--val M] [--seed S]
[--size PX] [--workers W]``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from agvm_ds.data.shapes import SHAPE_NAMES, render_scene
from agvm_ds.data.coco import encode_mask

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump whenever rendered bytes change: cached copies then regenerate
CATEGORY_IDS = (1, 2, 4, 5, 7, 8)  # non-contiguous on purpose, like COCO's
SPLIT_CODES = {"train": 0, "val": 1}
MARKER = ".complete.json"


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, zeros first."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def _render_one(job: tuple) -> tuple[dict, list[dict]]:
    """Render, write and annotate image ``index`` of ``split`` (annotation ids come later)."""
    out, split, index, seed, size = job
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    short = int(round(size * rng.uniform(0.75, 1.0)))
    height, width = (size, short) if rng.random() < 0.5 else (short, size)
    image, objects, semantic = render_scene(rng, height, width)
    image_id = index + 1
    file_name = f"{image_id:012d}.png"
    # PNG is lossless at every level; level 1 encodes the noisy backgrounds ~2x faster than
    # PIL's default 6, for files ~10 % larger (the pixels are the same)
    Image.fromarray(image).save(Path(out) / split / file_name, format="PNG", compress_level=1)
    Image.fromarray(semantic).save(Path(out) / "semantic" / split / file_name, format="PNG",
                                   compress_level=1)
    anns = []
    for obj in objects:
        ys, xs = np.nonzero(obj.visible)
        x0, y0 = int(xs.min()), int(ys.min())
        if obj.polygons is not None:
            seg = obj.polygons
        elif rng.random() < 0.5:
            seg = encode_mask(obj.visible)
        else:
            seg = _uncompressed_rle(obj.visible)
        anns.append({"image_id": image_id, "category_id": CATEGORY_IDS[obj.label],
                     "bbox": [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)],
                     "area": float(obj.visible.sum()), "iscrowd": 0, "segmentation": seg})
    info = {"id": image_id, "file_name": file_name, "width": width, "height": height}
    return info, anns


def generate(out: str | os.PathLike, train: int = 2000, val: int = 200, seed: int = 0,
             size: int = 128, workers: int = 1) -> dict:
    """Write the benchmark into ``out`` (created if missing); return a small summary."""
    for name, value, low in (("train", train, 0), ("val", val, 0), ("seed", seed, 0), ("size", size, 32)):
        if int(value) < low:
            raise ValueError(f"synthetic benchmark: {name} must be >= {low}, got {value}")
    out = Path(out)
    start = time.perf_counter()
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": cid, "name": name, "supercategory": "shape"}
                  for cid, name in zip(CATEGORY_IDS, SHAPE_NAMES)]
    summary = {"params": params(train, val, seed, size)}
    for split, count in (("train", train), ("val", val)):
        (out / split).mkdir(exist_ok=True)
        (out / "semantic" / split).mkdir(parents=True, exist_ok=True)
        jobs = [(str(out), split, i, seed, size) for i in range(count)]
        if workers > 1 and count > 64:
            with mp.get_context("spawn").Pool(workers) as pool:
                rendered = pool.map(_render_one, jobs, chunksize=32)
        else:
            rendered = [_render_one(j) for j in jobs]
        images, annotations = [], []
        for info, anns in rendered:
            images.append(info)
            for ann in anns:
                annotations.append({"id": len(annotations) + 1, **ann})
        doc = {"info": {"description": "agvm-ds embedded shapes benchmark", **summary["params"]},
               "licenses": [], "images": images, "annotations": annotations,
               "categories": categories}
        with open(out / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        summary[split] = {"images": len(images), "annotations": len(annotations)}
    with open(out / "annotations" / "semantic_classes.json", "w") as f:
        json.dump(["background", *SHAPE_NAMES], f)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def params(train: int, val: int, seed: int, size: int) -> dict:
    return {"version": GENERATOR_VERSION, "train": int(train), "val": int(val),
            "seed": int(seed), "size": int(size)}


def ensure_synthetic(cache_dir: str | os.PathLike, train: int = 2000, val: int = 200,
                     seed: int = 0, size: int = 128, workers: int = 1,
                     announce: Optional[Callable[[str], None]] = None) -> Path:
    """Return the benchmark's root under ``cache_dir``, generating it on first use.

    ``announce(line)`` is called once just before a generation starts (the launcher prints
    the line: generating the quickstart's 2200 images takes ~25 s on 2 cores) and once after.

    The folder name encodes every parameter and a marker file records them, so changed
    parameters (or a new generator version) get their own fresh dataset. Generation goes
    into a temporary sibling that is renamed into place only when complete, under a file
    lock, so concurrent ranks or a killed run never see (or leave) a half-written dataset.
    """
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    wanted = params(train, val, seed, size)
    final = cache_dir / f"shapes-v{GENERATOR_VERSION}-px{size}-train{train}-val{val}-seed{seed}"
    if _is_complete(final, wanted):
        return final
    with open(cache_dir / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(final, wanted):  # another process finished while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_dir))
        if announce is not None:
            announce(f"generating the embedded shapes benchmark ({train} train + {val} val images, {size} px, "
                     f"{workers} process(es)) into {final} (first use only)")
        try:
            summary = generate(tmp, train, val, seed, size, workers)
            (tmp / MARKER).write_text(json.dumps(wanted, sort_keys=True))
            if final.exists():  # stale or partial leftover with no valid marker
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info("generated synthetic benchmark %s in %.1fs", final, summary["seconds"])
        if announce is not None:
            announce(f"benchmark generated in {summary['seconds']:.1f} s")
    return final


def _is_complete(root: Path, wanted: dict) -> bool:
    try:
        return json.loads((root / MARKER).read_text()) == wanted
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agvm_ds.data.synthetic",
                                     description="Write the embedded shapes benchmark in COCO layout.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="long image side in pixels")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes")
    args = parser.parse_args(argv)
    try:
        summary = generate(args.out, args.train, args.val, args.seed, args.size, args.workers)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
