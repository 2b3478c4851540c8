"""Turn model predictions into COCO result dicts (the format pycocotools' ``loadRes`` reads).

Models return one dict per image in *original* image coordinates (see docs/interfaces.md):
``boxes`` xyxy ``[k, 4]``, ``scores`` ``[k]``, ``labels`` ``[k]`` as contiguous class
indices, and for instance segmentation ``masks`` bool ``[k, H0, W0]``. COCO results need
xywh boxes, the dataset's own (often non-contiguous) category ids, and masks as RLE whose
``counts`` is a ``str`` so the list can be written with :mod:`json` and sent between ranks.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from agvm_ds.data.coco import encode_mask


def _to_numpy(value: Any) -> np.ndarray:
    """Accept torch tensors (any device/dtype) and array-likes alike."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def to_coco_results(predictions: Sequence[dict], image_ids: Sequence[int],
                    cat_ids: Sequence[int]) -> list[dict]:
    """Convert per-image prediction dicts to a flat list of COCO result dicts.

    ``predictions[i]`` belongs to ``image_ids[i]``; ``cat_ids[c]`` is the COCO category id
    of contiguous label ``c``. Each result has ``image_id``, ``category_id``, ``bbox``
    (xywh, original pixels), ``score`` and, when the prediction has ``masks``, a
    ``segmentation`` RLE. A prediction without ``boxes`` but with ``masks`` gets the boxes
    of its masks, so mask-only models still produce valid results.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"to_coco_results: {len(predictions)} predictions but "
                         f"{len(image_ids)} image ids; they must pair up one to one")
    cat_ids = [int(c) for c in cat_ids]
    results: list[dict] = []
    for pred, image_id in zip(predictions, image_ids):
        if "scores" not in pred or "labels" not in pred:
            raise ValueError(f"to_coco_results: prediction for image {image_id} needs "
                             f"'scores' and 'labels' (got keys {sorted(pred)})")
        scores = _to_numpy(pred["scores"]).astype(np.float64).reshape(-1)
        labels = _to_numpy(pred["labels"]).astype(np.int64).reshape(-1)
        masks = _to_numpy(pred["masks"]) if pred.get("masks") is not None else None
        if masks is not None and masks.ndim == 4:  # [k, 1, H, W] from some mask heads
            masks = masks[:, 0]
        if pred.get("boxes") is not None:
            boxes = _to_numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)
        elif masks is not None:
            boxes = _boxes_from_masks(masks)
        else:
            raise ValueError(f"to_coco_results: prediction for image {image_id} has "
                             "neither 'boxes' nor 'masks'")
        k = len(scores)
        if len(labels) != k or len(boxes) != k or (masks is not None and len(masks) != k):
            raise ValueError(f"to_coco_results: image {image_id} has {len(boxes)} boxes, "
                             f"{k} scores, {len(labels)} labels"
                             + ("" if masks is None else f", {len(masks)} masks")
                             + "; they must all have the same length")
        bad = labels[(labels < 0) | (labels >= len(cat_ids))]
        if len(bad):
            raise ValueError(f"to_coco_results: image {image_id} has label {int(bad[0])} "
                             f"outside 0..{len(cat_ids) - 1} (contiguous labels expected)")
        for j in range(k):
            x1, y1, x2, y2 = boxes[j]
            res = {
                "image_id": int(image_id),
                "category_id": cat_ids[int(labels[j])],
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "score": float(scores[j]),
            }
            if masks is not None:
                res["segmentation"] = encode_mask(masks[j] > 0)
            results.append(res)
    return results


def _boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes (pixel-edge convention) of ``[k, H, W]`` masks; empty → zeros."""
    boxes = np.zeros((len(masks), 4), dtype=np.float64)
    for j, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(xs):
            boxes[j] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return boxes
