"""mIoU against a naive per-class loop on random label maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agvm_ds.evaluation.miou import confusion_matrix, mean_iou, miou_from_confusion


def naive_miou(preds, gts, num_classes, ignore=255):
    """Per class: count intersection and union pixel by pixel over all images."""
    ious = []
    for c in range(num_classes):
        inter = union = 0
        for p, g in zip(preds, gts):
            valid = g != ignore
            inter += int(((p == c) & (g == c) & valid).sum())
            union += int((((p == c) | (g == c)) & valid).sum())
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)), ious


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    c = 6
    gts = [rng.integers(0, c, (17, 23)) for _ in range(4)]
    for g in gts:
        g[rng.random(g.shape) < 0.1] = 255  # ignored pixels
    # Predictions: mostly right, some noise; class 5 never predicted, never in image 0.
    preds = [np.where(rng.random(g.shape) < 0.6, np.where(g == 255, 0, g), rng.integers(0, c, g.shape))
             for g in gts]
    expected, per_class = naive_miou(preds, gts, c)
    out = mean_iou(preds, gts, c)
    assert out["mIoU"] == pytest.approx(expected, abs=1e-12)
    assert [v for v in out["IoU"].values() if v is not None] == pytest.approx(per_class)
    valid = np.concatenate([(g != 255).ravel() for g in gts])
    correct = np.concatenate([(p == g).ravel() for p, g in zip(preds, gts)])
    assert out["aAcc"] == pytest.approx(correct[valid].mean())


def test_absent_classes_are_left_out_and_shards_add_up():
    gt = np.array([[0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 3]])
    out = mean_iou([pred], [gt], num_classes=4, class_names=["a", "b", "c", "d"])
    # a: 1/2, b: 1/2, c and d: no pixels anywhere (pixel with pred 3 is ignored) → undefined.
    assert out["IoU"] == {"a": 0.5, "b": 0.5, "c": None, "d": None}
    assert out["mIoU"] == 0.5
    whole = confusion_matrix(pred, gt, 4)
    halves = confusion_matrix(pred[:, :2], gt[:, :2], 4) + confusion_matrix(pred[:, 2:], gt[:, 2:], 4)
    assert torch.equal(whole, halves)
    assert miou_from_confusion(torch.zeros(3, 3, dtype=torch.int64))["mIoU"] == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="must match"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="predicted label outside"):
        confusion_matrix(np.full((2, 2), 3), np.zeros((2, 2)), 3)
