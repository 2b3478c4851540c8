"""Test-time size and score threshold: read, checked and applied in one place.

The test-time resize is the data pipeline's shortest-edge rule
(:class:`~agvm_ds.data.transforms.Transform`): the short side becomes ``min_size`` unless
the long side would then pass ``max_size``. A model's sizes are those it was evaluated
with during training (``data.test_min_size`` or the largest ``data.min_size``, and
``data.max_size``) until ``--min_size`` / ``--max_size`` of ``launch/export.py``,
``launch/predict.py`` or ``launch/evaluate.py`` replace them; an export records them in its
``config.json`` (``transform.min_size``, ``transform.max_size``) with the default
``score_threshold``, and ``load_model(export).predict`` uses what it records.

Several ``min_size`` values are test-time augmentation: each image is predicted once per
size, every result is already in the image's own pixels (the network divides by the
resize's scale factor), and the union is reduced by class-wise NMS at the head's
``nms_thresh`` to its ``max_detections`` (detectron2's and mmdetection's box TTA). Instance
masks follow their boxes. Semantic segmentation predicts class maps without scores, so
there is nothing to merge: it takes one size.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

from agvm_ds.errors import ConfigError

__all__ = ["MultiScale", "apply_test_options", "merge_predictions", "merge_settings", "score_threshold",
           "sizes_of", "transforms"]

#: where the class-wise NMS settings of a merge come from, first found wins (R-CNN, RetinaNet)
_HEAD_SECTIONS = ("roi_box", "head")
#: the heads' default NMS IoU and detections per image, for a spec that states neither
DEFAULT_NMS, DEFAULT_DETECTIONS = 0.5, 100


def sizes_of(info: dict) -> list[int]:
    """The recorded ``transform.min_size`` as a list (one entry: one size)."""
    sizes = info["transform"]["min_size"]
    return [int(sizes)] if isinstance(sizes, int) else [int(s) for s in sizes]


def score_threshold(info: dict, given: Optional[float] = None, default: float = 0.0) -> float:
    """``given``, else the export's recorded ``score_threshold``, else ``default``."""
    if given is not None:
        return float(given)
    recorded = info.get("score_threshold")
    return default if recorded is None else float(recorded)


def apply_test_options(info: dict, min_size: Optional[Sequence[int]] = None,
                       max_size: Optional[int] = None, score: Optional[float] = None) -> dict:
    """A copy of a model's ``info`` (``model.info`` / an export's ``config.json``) with the
    given options in place of the recorded ones; raises ConfigError naming the option.

    ``min_size``: one or more short sides (several: test-time augmentation); ``max_size``:
    the long-side cap; ``score``: the default score threshold of ``predict``."""
    out = copy.deepcopy(info)
    t = out["transform"]
    if min_size is not None:
        sizes = [min_size] if isinstance(min_size, int) else list(min_size)
        if not sizes or any(not isinstance(s, int) or s < 1 for s in sizes):
            raise ConfigError(f"--min_size: positive integers, got {min_size}")
        t["min_size"] = sizes[0] if len(sizes) == 1 else list(dict.fromkeys(sizes))
    if max_size is not None:
        if not isinstance(max_size, int) or max_size < 1:
            raise ConfigError(f"--max_size: a positive integer, got {max_size}")
        t["max_size"] = max_size
    cap = t.get("max_size")
    if min_size is not None and cap is not None and max(sizes_of(out)) > cap:
        # the cap would win on every image: the short side could never be min_size
        where = "--max_size" if max_size is not None else "the model's max_size"
        raise ConfigError(f"--min_size {max(sizes_of(out))}: larger than {where} {cap}, which caps the "
                          f"long side, so no short side could reach it; give --max_size too")
    if len(sizes_of(out)) > 1 and out.get("task") == "semantic":
        raise ConfigError("--min_size: several sizes (test-time augmentation) merge scored boxes; a "
                          "semantic segmentation model predicts class maps, give one size")
    if score is not None:
        if not 0.0 <= score <= 1.0:
            raise ConfigError(f"--score_threshold: must be in [0, 1], got {score}")
        out["score_threshold"] = float(score)
    return out


def transforms(info: dict) -> list:
    """One test-time :class:`~agvm_ds.data.transforms.Transform` per recorded size."""
    from agvm_ds.data.transforms import Transform

    t = info["transform"]
    return [Transform(s, t["max_size"], 0.0, t["mean"], t["std"]) for s in sizes_of(info)]


def merge_settings(spec: dict, network=None) -> tuple[float, int]:
    """(NMS IoU threshold, detections per image) of the model's box head: the spec's, else
    the network's own (torchvision detectors keep them as ``nms_thresh`` and
    ``detections_per_img`` on the module that applies them: the model for RetinaNet/FCOS/SSD,
    ``roi_heads`` for the R-CNNs), else (0.5, 100) (e.g. DETR, which has no NMS)."""
    for section in _HEAD_SECTIONS:
        head = spec.get(section) if isinstance(spec, dict) else None
        if isinstance(head, dict) and "nms_thresh" in head:
            return float(head["nms_thresh"]), int(head.get("max_detections", DEFAULT_DETECTIONS))
    if network is not None:
        for module in network.modules():
            nms, top = getattr(module, "nms_thresh", None), getattr(module, "detections_per_img", None)
            if isinstance(nms, (int, float)) and isinstance(top, int) and not isinstance(top, bool):
                return float(nms), int(top)
    return DEFAULT_NMS, DEFAULT_DETECTIONS


def merge_predictions(preds: list[dict], nms_thresh: float, max_detections: int) -> dict:
    """One image's predictions at several sizes (each in the image's pixels) → one: the
    union, class-wise NMS, the ``max_detections`` best by score."""
    from agvm_ds.ops import batched_nms

    if len(preds) == 1:
        return preds[0]
    keys = [k for k in ("boxes", "scores", "labels", "masks") if k in preds[0]]
    union = {k: torch.cat([p[k] for p in preds]) for k in keys}
    keep = batched_nms(union["boxes"], union["scores"], union["labels"], nms_thresh)[:max_detections]
    return {**preds[0], **{k: v[keep] for k, v in union.items()}}


class MultiScale:
    """A dataset transform giving an image at its first size, with its other sizes in the
    target (``target["more_sizes"]``: ``(tensor, target)`` pairs) for a predict callback
    to run and merge (``launch/evaluate.py``)."""

    def __init__(self, sizes: list):
        self.sizes = sizes

    def __call__(self, image, target):
        first, out = self.sizes[0](image, target)
        if len(self.sizes) > 1:
            out["more_sizes"] = [t(image, target) for t in self.sizes[1:]]
        return first, out

