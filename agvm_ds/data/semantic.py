"""Semantic segmentation from PNG label maps (COCO-stuff style or ADE20K style).

A label map is a single-channel PNG the size of its image whose pixel values are class
indices, ``255`` meaning "ignore". Two common conventions are supported:

* COCO-stuff / the embedded benchmark: values are already ``0..C-1`` (``255`` unlabeled).
* ADE20K: ``0`` means "other" and classes are ``1..C``; ``reduce_zero_label=True`` maps
  ``0 → 255`` and ``v → v-1``.

Which images exist comes from ``annotations/instances_{split}.json`` when present (so image
ids match the detection annotations), else from the label folder (image = same stem,
``.jpg``/``.jpeg``/``.png``). Label maps are validated when read: a value outside
``0..C-1`` and not ``255`` is a :class:`DatasetError` naming the file, because silently
training on a wrong class count corrupts the confusion matrix and the loss alike.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from agvm_ds.data.coco import coco_from_dict, read_json
from agvm_ds.data.errors import DatasetError
from agvm_ds.data.headers import check_headers
from agvm_ds.data.images import decode_image
from agvm_ds.data.memo import ImageMemo
from agvm_ds.data.transforms import IGNORE_INDEX, Transform

logger = logging.getLogger(__name__)
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class SemanticSegDataset(torch.utils.data.Dataset):
    """``dataset[i]`` → ``(image, target)`` with ``target["sem_seg"]`` int64 ``[H, W]``.

    Exposes ``num_classes``, ``class_names``, ``cat_ids`` (``0..C-1``: semantic classes are
    their own ids), ``ids`` and ``coco`` (the instances ground truth when the split has an
    instances file, else None). ``load_sem_seg(i)`` gives the original-size label map for
    evaluation.
    """

    def __init__(self, root: str | os.PathLike, split: str, image_dir: str = "{split}",
                 label_dir: str = "semantic/{split}",
                 ann_file: str = "annotations/instances_{split}.json",
                 num_classes: int | None = None,
                 classes_file: str = "annotations/semantic_classes.json",
                 reduce_zero_label: bool = False, transform: Callable | None = None,
                 check_files: bool = True, image_memo_bytes: int = 0,
                 header_cache: Path | None = None):
        self.root, self.split = Path(root), split
        self.image_root = self.root / image_dir.format(split=split)
        self.label_root = self.root / label_dir.format(split=split)
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform if transform is not None else Transform(None, None)
        self._memo = ImageMemo(image_memo_bytes)  # decoded images reused across epochs
        self.class_names = self._class_names(num_classes, self.root / classes_file)
        self.num_classes = len(self.class_names)
        self.cat_ids = list(range(self.num_classes))
        if not self.label_root.is_dir():
            raise DatasetError(f"{self.label_root}: label map folder not found")
        ann_path = self.root / ann_file.format(split=split)
        self.coco = None
        if ann_path.is_file():
            doc = read_json(ann_path)
            if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
                raise DatasetError(f"{ann_path}: expected a COCO file with an 'images' list")
            self.coco = coco_from_dict({"annotations": [], "categories": [], **doc})
            self.ids = sorted(self.coco.imgs)
            self._files = {i: self.coco.imgs[i]["file_name"] for i in self.ids}
        else:
            self.ids, self._files = self._scan()
        if not self.ids:
            raise DatasetError(f"{self.label_root}: no images for split {split!r}")
        if check_files:
            for image_id in self.ids:
                for path in (self.image_path(image_id), self.label_path(image_id)):
                    if not path.is_file():
                        raise DatasetError(f"{path}: file not found (split {split!r})")
            listing = str(ann_path if self.coco is not None else self.label_root)
            check_headers(self.image_root, ((self._files[i], None) for i in self.ids), listing, header_cache)
            check_headers(self.label_root, ((Path(self._files[i]).stem + ".png", None) for i in self.ids),
                          f"{self.label_root} (label maps)", header_cache)

    @staticmethod
    def _class_names(num_classes: int | None, classes_file: Path) -> list[str]:
        if num_classes is not None:
            if num_classes < 1:
                raise ValueError(f"SemanticSegDataset: num_classes must be >= 1, got {num_classes}")
            return [str(i) for i in range(num_classes)]
        if not classes_file.is_file():
            raise DatasetError(f"{classes_file}: not found, and the number of semantic classes "
                               "was not given (set data.semantic_classes)")
        names = read_json(classes_file)
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{classes_file}: expected a non-empty JSON list of class names")
        return names

    def _scan(self) -> tuple[list[int], dict[int, str]]:
        """Pair label maps with images by file stem when there is no instances file."""
        labels = sorted(p for p in os.listdir(self.label_root) if p.endswith(".png"))
        present = set(os.listdir(self.image_root)) if self.image_root.is_dir() else set()
        ids, files = [], {}
        for k, name in enumerate(labels):
            stem = name[:-4]
            image = next((stem + e for e in IMAGE_EXTS if stem + e in present), None)
            if image is None:
                raise DatasetError(f"{self.label_root / name}: no image {stem}.jpg/.png in "
                                   f"{self.image_root}")
            image_id = int(stem) if stem.isdigit() else k
            if image_id in files:
                image_id = k  # non-unique numeric stems: fall back to positions
            ids.append(image_id)
            files[image_id] = image
        return ids, files

    def image_path(self, image_id: int) -> Path:
        return self.image_root / self._files[image_id]

    def label_path(self, image_id: int) -> Path:
        return self.label_root / (Path(self._files[image_id]).stem + ".png")

    def __len__(self) -> int:
        return len(self.ids)

    def load_sem_seg(self, index: int) -> np.ndarray:
        """Original-size label map (int64, ``255`` = ignore), validated against the classes."""
        path = self.label_path(self.ids[index])
        try:
            with Image.open(path) as im:
                labels = np.array(im)
        except FileNotFoundError:
            raise DatasetError(f"{path}: label map not found") from None
        except OSError as err:
            raise DatasetError(f"{path}: cannot read label map ({err})") from None
        if labels.ndim != 2:
            raise DatasetError(f"{path}: label map must be single-channel, got shape {labels.shape}")
        labels = labels.astype(np.int64)
        if self.reduce_zero_label:
            labels = np.where(labels == 0, IGNORE_INDEX, labels - 1)
            labels[labels == IGNORE_INDEX - 1] = IGNORE_INDEX
        bad = labels[(labels >= self.num_classes) & (labels != IGNORE_INDEX)]
        if len(bad):
            raise DatasetError(f"{path}: label value {int(bad[0])} is outside 0..{self.num_classes - 1}"
                               f" (and is not the ignore value {IGNORE_INDEX})")
        return labels

    def load_image(self, index: int) -> Image.Image:
        return self._memo.get(index, self._decode)

    def _decode(self, index: int) -> Image.Image:
        return decode_image(self.image_path(self.ids[index]))

    def __getitem__(self, index: int):
        image = self.load_image(index)
        labels = self.load_sem_seg(index)
        if labels.shape != (image.size[1], image.size[0]):
            raise DatasetError(f"{self.label_path(self.ids[index])}: label map is "
                               f"{labels.shape[1]}x{labels.shape[0]} but its image is "
                               f"{image.size[0]}x{image.size[1]}")
        target = {"sem_seg": labels, "image_id": self.ids[index]}
        return self.transform(image, target)
