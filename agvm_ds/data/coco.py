"""COCO-format detection and instance-segmentation datasets, with strict validation.

Reads the real COCO layout: ``ROOT/annotations/instances_{split}.json`` plus an image
folder (``ROOT/{split}/`` by default, a template so ``train2017`` etc. work). The JSON is
checked once, up front, because a bad annotation found in a data-loader worker hours into
a run is far more expensive than a one-off check: every problem raises
:class:`~agvm_ds.data.errors.DatasetError` naming the file and the annotation.

What COCO users expect to be *skipped* is skipped, with a log line giving the counts:
crowd annotations (``iscrowd=1``) never become training targets (pycocotools still sees
them, so evaluation treats them as "ignore" regions), and in training, images left without
any annotation are dropped (``filter_empty``, on by default as in detectron2 and mmdetection;
off, they train as pure background). Every listed image's header is checked before training
(:mod:`agvm_ds.data.headers`). Boxes outside the image or with zero area are errors unless
``skip_invalid_boxes=True`` (then they are dropped and counted, like mmdet/detectron2 do).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from agvm_ds.data.errors import DatasetError
from agvm_ds.data.headers import check_headers
from agvm_ds.data.images import decode_image
from agvm_ds.data.memo import ImageMemo

logger = logging.getLogger(__name__)

BOX_TOLERANCE = 1.0  # pixels a box may stick out of the image (float rounding in exports)


def read_json(path: Path) -> object:
    """``json.load`` with a :class:`DatasetError` naming the file, line and column."""
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: "
                           f"{err.msg}") from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not a UTF-8 JSON file ({err.reason})") from None


def encode_mask(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of one binary ``[H, W]`` mask, with ``counts`` as ``str``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    rle["size"] = [int(s) for s in rle["size"]]
    return rle


def _require(path: Path, obj: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DatasetError(f"{path}: {what} is missing key(s) {missing}")


def _objects(path: Path, doc: dict, key: str) -> list:
    """``doc[key]``, each entry checked to be a JSON object (a number or a string there would
    otherwise fail later as a bare ``TypeError``)."""
    for k, entry in enumerate(doc[key]):
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: '{key}' entry #{k} is not an object: {entry!r:.80}")
    return doc[key]


def _id(path: Path, obj: dict, key: str, what: str) -> None:
    """``obj[key]`` is an integer id: ids are compared and sorted together, and results
    carry them as ints, so ``"2"`` beside ``1`` would fail (or never match) far from here."""
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(f"{path}: {what}: '{key}' must be an integer (COCO ids are), got "
                           f"{value!r:.40} ({type(value).__name__})")


def _pixels(path: Path, img: dict, key: str) -> None:
    """``img[key]`` (width or height) is a positive whole number of pixels (``64.0`` too)."""
    value = img[key]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value <= 0 or value != int(value)):
        raise DatasetError(f"{path}: image {img['id']} ({img['file_name']}): '{key}' must be a "
                           f"positive integer, got {value!r:.40} ({type(value).__name__})")


def load_coco_json(path: str | os.PathLike, skip_invalid_boxes: bool = False) -> dict:
    """Read and validate a COCO instances file; return the (possibly filtered) document.

    Checks: top-level ``images``/``annotations``/``categories`` lists; unique image and
    category ids; positive image sizes; every annotation names a known image and category
    and has a 4-number box inside its image (± ``BOX_TOLERANCE``) with positive area.
    A missing ``iscrowd`` defaults to 0 and a missing ``area`` to the box area, as the
    pycocotools evaluator needs both.
    """
    path = Path(path)
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'images', 'annotations' and "
                           f"'categories', got {type(doc).__name__}")
    _require(path, doc, ("images", "annotations", "categories"), "the file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {type(doc[key]).__name__}")
    cats: dict[int, dict] = {}
    for k, cat in enumerate(_objects(path, doc, "categories")):
        _require(path, cat, ("id", "name"), f"category {cat!r:.80}")
        _id(path, cat, "id", f"'categories' entry #{k} ({cat['name']!r:.40})")
        if cat["id"] in cats:
            raise DatasetError(f"{path}: duplicate category id {cat['id']}")
        cats[cat["id"]] = cat
    if not cats:
        raise DatasetError(f"{path}: 'categories' is empty")
    images: dict[int, dict] = {}
    for k, img in enumerate(_objects(path, doc, "images")):
        _require(path, img, ("id", "file_name", "width", "height"), f"image {img!r:.80}")
        _id(path, img, "id", f"'images' entry #{k} ({img['file_name']!r:.60})")
        if img["id"] in images:
            raise DatasetError(f"{path}: duplicate image id {img['id']}")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise DatasetError(f"{path}: image {img['id']}: 'file_name' must be a non-empty "
                               f"string, got {img['file_name']!r:.40}")
        _pixels(path, img, "width")
        _pixels(path, img, "height")
        images[img["id"]] = img
    kept, bad_boxes = [], []
    for k, ann in enumerate(_objects(path, doc, "annotations")):
        _require(path, ann, ("id", "image_id", "category_id", "bbox"), f"annotation {ann!r:.80}")
        for key in ("id", "image_id", "category_id"):
            _id(path, ann, key, f"'annotations' entry #{k}")
        where = f"{path}: annotation id {ann['id']} (image {ann['image_id']})"
        if ann["category_id"] not in cats:
            raise DatasetError(f"{where}: unknown category_id {ann['category_id']}; "
                               f"'categories' has ids {sorted(cats)}")
        img = images.get(ann["image_id"])
        if img is None:
            raise DatasetError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        problem = _box_problem(ann["bbox"], img["width"], img["height"])
        if problem is None:
            # pycocotools' evaluator reads both; files from other tools sometimes omit them.
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
            kept.append(ann)
        elif skip_invalid_boxes:
            bad_boxes.append(f"annotation id {ann['id']}: {problem}")
        else:
            raise DatasetError(f"{where}: {problem} (set skip_invalid_boxes to drop such boxes)")
    if bad_boxes:
        logger.warning("%s: skipped %d annotation(s) with invalid boxes, e.g. %s",
                       path, len(bad_boxes), bad_boxes[0])
        doc = {**doc, "annotations": kept}
    return doc


def _box_problem(bbox, width: float, height: float) -> str | None:
    """Why ``bbox`` (xywh) is unusable in a ``width`` x ``height`` image, or None."""
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        return f"bbox {bbox!r} is not 4 finite numbers [x, y, w, h]"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bbox {list(bbox)} has zero area (w={w}, h={h})"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"bbox {list(bbox)} lies outside the {width}x{height} image"
    return None


def coco_from_dict(doc: dict) -> COCO:
    """A pycocotools ``COCO`` built from an in-memory document, without its stdout chatter."""
    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def decode_segmentation(segm, height: int, width: int, where: str) -> np.ndarray:
    """Polygons, uncompressed RLE or compressed RLE → uint8 ``[H, W]`` mask."""
    try:
        if isinstance(segm, list):  # polygons
            polys = [p for p in segm if len(p) >= 6]
            if not polys:
                raise ValueError("no polygon with at least 3 points")
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, height, width)
        elif isinstance(segm, dict) and "counts" in segm:
            rle = segm
            if list(segm.get("size", [])) != [height, width]:
                raise ValueError(f"RLE size {segm.get('size')} != image size [{height}, {width}]")
        else:
            raise ValueError(f"unrecognised segmentation {segm!r:.60}")
        return mask_utils.decode(rle)
    except (ValueError, TypeError, KeyError) as err:
        raise DatasetError(f"{where}: bad segmentation: {err}") from None


class CocoDataset(torch.utils.data.Dataset):
    """Detection (``task="detection"``) or instance segmentation (``task="instance"``).

    ``dataset[i]`` → ``(image, target)`` in the format of docs/interfaces.md after
    ``transform`` (a :class:`agvm_ds.data.transforms.Transform`; default: no resize, no
    flip, ImageNet normalization). Exposes ``num_classes``, ``cat_ids`` (contiguous index →
    COCO category id), ``class_names``, ``coco`` (all ground truth, crowd included) and
    ``ids`` (the image ids in dataset order).
    """

    def __init__(self, root: str | os.PathLike, split: str, task: str = "detection",
                 image_dir: str = "{split}", ann_file: str = "annotations/instances_{split}.json",
                 transform: Callable | None = None, train: bool = False,
                 skip_invalid_boxes: bool = False, check_files: bool = True,
                 image_memo_bytes: int = 0, filter_empty: bool = True,
                 header_cache: Optional[Path] = None):
        if task not in ("detection", "instance"):
            raise ValueError(f"CocoDataset: task must be 'detection' or 'instance', got {task!r}")
        from agvm_ds.data.transforms import Transform  # local: transforms imports nothing here

        self.root, self.split, self.task, self.train = Path(root), split, task, train
        self.ann_file = self.root / ann_file.format(split=split)
        self.image_root = self.root / image_dir.format(split=split)
        self.transform = transform if transform is not None else Transform(None, None)
        self._memo = ImageMemo(image_memo_bytes)  # decoded images reused across epochs
        doc = load_coco_json(self.ann_file, skip_invalid_boxes)
        self.coco = coco_from_dict(doc)
        self.cat_ids = sorted(self.coco.cats)
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.num_classes = len(self.cat_ids)
        self._label = {cid: i for i, cid in enumerate(self.cat_ids)}
        ids, crowd, empty = [], 0, 0
        for image_id in sorted(self.coco.imgs):
            anns = self.coco.imgToAnns.get(image_id, [])
            n_crowd = sum(1 for a in anns if a.get("iscrowd", 0))
            crowd += n_crowd
            if train and filter_empty and len(anns) == n_crowd:
                empty += 1
                continue
            ids.append(image_id)
        if crowd:
            logger.info("%s: %d crowd annotation(s) are not used as targets", self.ann_file, crowd)
        if empty:
            logger.info("%s: skipped %d training image(s) without (non-crowd) annotations "
                        "(data.filter_empty)", self.ann_file, empty)
        if not ids:
            raise DatasetError(f"{self.ann_file}: no usable images"
                               + (" (training skips images without annotations unless data.filter_empty "
                                  "is false)" if train and filter_empty else ""))
        self.ids = ids
        if task == "instance":
            for image_id in ids:
                for a in self.coco.imgToAnns.get(image_id, []):
                    if not a.get("iscrowd", 0) and not a.get("segmentation"):
                        raise DatasetError(f"{self.ann_file}: annotation id {a['id']} (image "
                                           f"{image_id}) has no segmentation (task 'instance')")
        self._header_cache = header_cache
        if check_files:
            self._check_files()

    def _check_files(self) -> None:
        """The image folder exists, no listed file is missing, and every listed file's header
        is an image of the declared size (:func:`agvm_ds.data.headers.check_headers`, cached)."""
        if not self.image_root.is_dir():
            raise DatasetError(f"{self.image_root}: image folder not found (annotations: "
                               f"{self.ann_file})")
        present = set(os.listdir(self.image_root))
        missing = [self.coco.imgs[i]["file_name"] for i in self.ids
                   if self.coco.imgs[i]["file_name"] not in present
                   and not (self.image_root / self.coco.imgs[i]["file_name"]).is_file()]
        if missing:
            raise DatasetError(f"{self.image_root / missing[0]}: image file not found "
                               f"({len(missing)} of {len(self.ids)} listed in {self.ann_file} "
                               "are missing)")
        check_headers(self.image_root, ((self.coco.imgs[i]["file_name"],
                                         (self.coco.imgs[i]["width"], self.coco.imgs[i]["height"]))
                                        for i in self.ids), str(self.ann_file), self._header_cache)

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, index: int) -> Image.Image:
        """The RGB image at ``index``, checked against the size the JSON declares (decoded
        and checked once while ``image_memo_bytes`` lasts)."""
        return self._memo.get(index, self._decode)

    def _decode(self, index: int) -> Image.Image:
        info = self.coco.imgs[self.ids[index]]
        path = self.image_root / info["file_name"]
        image = decode_image(path)
        if image.size != (info["width"], info["height"]):
            raise DatasetError(f"{path}: image is {image.size[0]}x{image.size[1]} but "
                               f"{self.ann_file} says {info['width']}x{info['height']}")
        return image

    def load_target(self, index: int) -> dict:
        """Original-size numpy target: boxes xyxy, contiguous labels, masks (instance)."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        h, w = info["height"], info["width"]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        np.clip(boxes[:, 0::2], 0, w, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, h, out=boxes[:, 1::2])
        target = {"boxes": boxes,
                  "labels": np.array([self._label[a["category_id"]] for a in anns], dtype=np.int64),
                  "image_id": image_id, "orig_size": (h, w)}
        if self.task == "instance":
            masks = np.zeros((len(anns), h, w), dtype=np.uint8)
            for j, a in enumerate(anns):
                masks[j] = decode_segmentation(a["segmentation"], h, w,
                                               f"{self.ann_file}: annotation id {a['id']}")
            target["masks"] = masks
        return target

    def __getitem__(self, index: int):
        return self.transform(self.load_image(index), self.load_target(index))
