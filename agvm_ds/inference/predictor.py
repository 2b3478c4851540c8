"""``model.predict(images)`` for a loaded model: images in, detections in image pixels out.

The images go through the test-time transform the model was evaluated with, or the one an
export records (its ``transform``: shortest-edge resize, normalization, batch padding to a
multiple of 32 — the same :class:`~agvm_ds.data.transforms.Transform` and
:func:`~agvm_ds.data.transforms.collate` evaluation uses; several ``min_size`` values are
test-time augmentation, :mod:`agvm_ds.inference.test_time`), then the network's own
``predict(batch, targets)``. Each result is a dict
in the original image's pixels, on the CPU: ``boxes`` (xyxy float ``[k, 4]``), ``scores``,
``labels`` (contiguous class indices; ``model.class_names[label]``), plus ``masks`` (bool
``[k, H, W]``) for Mask R-CNN, or only ``sem_seg`` (``[H, W]`` class indices) for semantic
segmentation.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from agvm_ds.errors import ModelFileError


def open_image(image: Any) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an ``H x W x 3`` uint8 array, decoded as
    training and evaluation decode (:func:`agvm_ds.data.images.to_rgb`: 16-bit scaled)."""
    from agvm_ds.data.errors import DatasetError
    from agvm_ds.data.images import decode_image, to_rgb

    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"predict: an array image must be H x W x 3 uint8, got "
                             f"{image.dtype} {list(image.shape)}")
        return Image.fromarray(image)
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ModelFileError(f"{path}: image not found")
        try:
            return decode_image(path)
        except DatasetError as err:
            raise ModelFileError(str(err)) from None
    raise TypeError(f"predict: an image must be a path, a PIL image or an array, got "
                    f"{type(image).__name__}")


def _keep(pred: dict, threshold: float) -> dict:
    out = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in pred.items()}
    if threshold > 0 and "scores" in out:
        keep = out["scores"] >= threshold
        for key in ("boxes", "scores", "labels", "masks"):
            if key in out:
                out[key] = out[key][keep]
    return out


@torch.no_grad()
def predict_images(model: torch.nn.Module, images: Any, score_threshold: Optional[float] = None,
                   batch_size: int = 4) -> list[dict]:
    """Predictions of ``model`` (from :func:`~agvm_ds.inference.model_dir.load_model`) for one
    image or a list of them, in order; see the module docstring for the result format.
    ``score_threshold``: None takes the export's recorded one (else 0). Several recorded
    sizes: each image is predicted at each and the results merged
    (:mod:`agvm_ds.inference.test_time`)."""
    from agvm_ds.data.transforms import collate, unpad_groups
    from agvm_ds.inference.test_time import merge_predictions, merge_settings, score_threshold as recorded
    from agvm_ds.inference.test_time import transforms

    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        images = [images]
    threshold = recorded(model.info, score_threshold)
    sizes = transforms(model.info)
    nms_thresh, max_detections = merge_settings(model.info.get("model_spec") or {}, model)
    divisor = int(model.info["transform"].get("size_divisibility", 32))
    param = next(model.parameters())
    results: list[dict] = []
    images = list(images)
    for start in range(0, len(images), max(1, batch_size)):
        opened = [open_image(im) for im in images[start:start + batch_size]]
        per_size = []
        for transform in sizes:
            pixels, targets = collate([transform(im, {"image_id": start + k}) for k, im in enumerate(opened)],
                                      divisor)
            preds: list = [None] * len(targets)
            # each image padded as alone, so --batch_size does not change a result
            for idx, crop, group in unpad_groups(pixels, targets, divisor):
                out = type(model).predict(model, crop.to(device=param.device, dtype=param.dtype), group)
                for k, pred in zip(idx, out):
                    preds[k] = {k2: (v.detach().cpu() if torch.is_tensor(v) else v) for k2, v in pred.items()}
            per_size.append(preds)
        results += [_keep(merge_predictions(list(one), nms_thresh, max_detections), threshold)
                    for one in zip(*per_size)]
    return results


def _predict(self, images: Any, targets: Sequence[dict] | None = None, score_threshold: Optional[float] = None,
             batch_size: int = 4) -> list[dict]:
    """Images (paths, PIL images, arrays) → predictions; a padded batch tensor with targets →
    the network's own ``predict(images, targets)`` (what evaluation calls)."""
    if torch.is_tensor(images):
        return type(self).predict(self, images, targets)
    return predict_images(self, images, score_threshold, batch_size)


def attach_predict(model: torch.nn.Module) -> None:
    """Give ``model`` (with ``model.info``) the image-taking ``predict`` of this module."""
    model.predict = types.MethodType(_predict, model)
