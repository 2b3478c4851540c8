"""Mean IoU for semantic segmentation via a confusion matrix.

A confusion matrix is additive, so shards (ranks, batches, images) are accumulated
independently and summed — that is what makes distributed mIoU exact and cheap (one
all-reduce of a ``C x C`` integer matrix). Classes that appear neither in the ground truth
nor in the predictions have an undefined IoU and are left out of the mean (the mmseg /
detectron2 convention); values are in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch

from agvm_ds.data.transforms import IGNORE_INDEX


def confusion_matrix(pred, gt, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``cm[g, p]`` = pixels with ground truth ``g`` predicted as ``p`` (int64 ``[C, C]``).

    Pixels whose ground truth is ``ignore_index`` are skipped. A prediction outside
    ``0..C-1`` on a counted pixel is a bug in the model's output and raises.
    """
    pred = torch.as_tensor(pred).reshape(-1).long().cpu()
    gt = torch.as_tensor(gt).reshape(-1).long().cpu()
    if pred.shape != gt.shape:
        raise ValueError(f"confusion_matrix: prediction has {pred.numel()} pixels, ground truth "
                         f"{gt.numel()}; they must match")
    keep = gt != ignore_index
    pred, gt = pred[keep], gt[keep]
    if len(gt) and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"confusion_matrix: ground-truth label {int(gt.max())} outside "
                         f"0..{num_classes - 1}")
    if len(pred) and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"confusion_matrix: predicted label outside 0..{num_classes - 1} "
                         f"(min {int(pred.min())}, max {int(pred.max())})")
    return torch.bincount(gt * num_classes + pred, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def miou_from_confusion(cm, class_names=None) -> dict:
    """``{"mIoU", "aAcc", "mAcc", "IoU": {class: iou}}`` from a confusion matrix.

    ``IoU`` per class is ``TP / (TP + FP + FN)``; an undefined class (no pixels in either)
    maps to ``None`` in the per-class dict and is excluded from the means.
    """
    cm = np.asarray(cm.cpu() if torch.is_tensor(cm) else cm, dtype=np.float64)
    tp = np.diag(cm)
    gt_pixels, pred_pixels = cm.sum(1), cm.sum(0)
    union = gt_pixels + pred_pixels - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_pixels > 0, tp / gt_pixels, np.nan)
    names = class_names if class_names is not None else [str(i) for i in range(len(cm))]
    total = cm.sum()
    return {
        "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any() else 0.0,
        "aAcc": float(tp.sum() / total) if total > 0 else 0.0,
        "IoU": {str(n): (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
    }


def mean_iou(preds, gts, num_classes: int, ignore_index: int = IGNORE_INDEX,
             class_names=None) -> dict:
    """:func:`miou_from_confusion` over pairs of label maps (any iterable of arrays)."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for p, g in zip(preds, gts):
        cm += confusion_matrix(p, g, num_classes, ignore_index)
    return miou_from_confusion(cm, class_names)
