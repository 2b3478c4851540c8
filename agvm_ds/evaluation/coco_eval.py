"""COCO box / mask AP with pycocotools, returned as a flat dict of the 12 standard stats.

The stats are named ``{iou_type}_{name}`` in pycocotools' ``summarize()`` order
(``bbox_AP``, ``bbox_AP50``, …, ``segm_ARl``), the names ``eval.json`` uses. Values are in
[0, 1]; pycocotools reports ``-1`` where a stat is undefined (e.g. no small objects in the
ground truth) and that is kept, so "undefined" is never confused with "zero".

Two things pycocotools does not do for us and we do here:
* an empty result list (a model that found nothing) must score 0, not crash ``loadRes``;
* mask results that also carry a ``bbox`` would make ``loadRes`` take the box area as the
  instance area, changing the small/medium/large split; the box is dropped for ``segm``.
  Polygon or uncompressed-RLE masks in a result file are converted to compressed RLE.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def stat_keys(iou_type: str) -> list[str]:
    return [f"{iou_type}_{name}" for name in STAT_NAMES]


def _check_results(coco_gt: COCO, results: Sequence[dict], iou_type: str) -> None:
    """Every result an object with the keys ``iou_type`` needs, of the types pycocotools
    assumes (it would fail on them as a bare ``TypeError`` / ``IndexError``, or, for a
    ``"3"`` where ids are ints, score nothing); ``ValueError`` naming the entry otherwise."""
    images, cats = set(coco_gt.imgs), set(coco_gt.cats)
    need = "bbox" if iou_type == "bbox" else "segmentation"
    for k, r in enumerate(results):
        if not isinstance(r, dict):
            raise ValueError(f"detection #{k} is not an object: {r!r:.80}")
        missing = [key for key in ("image_id", "category_id", "score", need) if key not in r]
        if missing:
            raise ValueError(f"detection #{k} is missing {missing} (needed for iou_type "
                             f"{iou_type!r}): {r!r:.120}")
        for key in ("image_id", "category_id"):
            if isinstance(r[key], bool) or not isinstance(r[key], int):
                raise ValueError(f"detection #{k}: '{key}' must be an integer, got "
                                 f"{r[key]!r:.40} ({type(r[key]).__name__})")
        if not _finite(r["score"]):
            raise ValueError(f"detection #{k}: 'score' must be a finite number, got {r['score']!r:.40}")
        if r["image_id"] not in images:
            raise ValueError(f"detection #{k}: image_id {r['image_id']} is not in the ground truth")
        if r["category_id"] not in cats:
            raise ValueError(f"detection #{k}: category_id {r['category_id']} is not in the "
                             f"ground truth categories {sorted(cats)}")
        if iou_type == "bbox":
            box = r["bbox"]
            if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(map(_finite, box))):
                raise ValueError(f"detection #{k}: 'bbox' must be 4 finite numbers [x, y, w, h], "
                                 f"got {box!r:.60}")
        else:
            img = coco_gt.imgs[r["image_id"]]
            problem = _segmentation_problem(r["segmentation"], img["height"], img["width"])
            if problem:
                raise ValueError(f"detection #{k}: 'segmentation' {problem}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _segmentation_problem(segm, height: int, width: int) -> str | None:
    """Why ``segm`` is not polygons or an RLE of a ``height`` x ``width`` image, or None."""
    if isinstance(segm, list):
        if not segm or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                               and all(map(_finite, p)) for p in segm):
            return "must be polygons: lists of at least 3 finite (x, y) pairs"
        return None
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        return f"must be polygons or an RLE object with 'counts' and 'size', got {segm!r:.60}"
    size = segm["size"]
    if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
        return f"RLE 'size' {segm['size']!r:.40} is not the image's [{height}, {width}]"
    counts = segm["counts"]
    if isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts):
        return None
    if isinstance(counts, (str, bytes)):  # compressed RLE (pycocotools' own encode gives bytes)
        return None
    return f"RLE 'counts' must be a string or a list of run lengths, got {counts!r:.40}"


def _as_rle(segm, height: int, width: int) -> dict:
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def _prepare(coco_gt: COCO, results: Iterable[dict], iou_type: str) -> list[dict]:
    """Copies of the results in the form ``loadRes`` handles correctly (see module doc)."""
    prepared = []
    for r in results:
        r = dict(r)
        if iou_type == "segm":
            img = coco_gt.imgs[r["image_id"]]
            r["segmentation"] = _as_rle(copy.deepcopy(r["segmentation"]), img["height"], img["width"])
            r.pop("bbox", None)
        else:
            r["bbox"] = [float(v) for v in r["bbox"]]
            r.pop("segmentation", None)
        prepared.append(r)
    return prepared


def _empty_results(coco_gt: COCO) -> COCO:
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                   "categories": copy.deepcopy(coco_gt.dataset["categories"])}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def evaluate_coco(coco_gt: COCO, results: Sequence[dict], iou_type: str = "bbox",
                  image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """The 12 COCO stats of ``results`` against ``coco_gt`` for ``iou_type`` (bbox|segm).

    ``image_ids`` restricts evaluation to those images (default: every ground-truth image,
    pycocotools' own default).
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    _check_results(coco_gt, results, iou_type)
    prepared = _prepare(coco_gt, results, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(prepared) if prepared else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.asarray(evaluator.stats, dtype=np.float64)
    return {key: float(v) for key, v in zip(stat_keys(iou_type), stats)}


def evaluate_results(coco_gt: COCO, results: Sequence[dict],
                     iou_types: Sequence[str] = ("bbox",),
                     image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """:func:`evaluate_coco` for several IoU types, merged into one dict."""
    stats: dict[str, float] = {}
    for iou_type in iou_types:
        stats.update(evaluate_coco(coco_gt, results, iou_type, image_ids))
    return stats
