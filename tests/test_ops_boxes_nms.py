"""Box IoU / GIoU and NMS against obvious per-pair / one-box-at-a-time references."""

import pytest
import torch

import agvm_ds  # noqa: F401  (torchvision compat)
from agvm_ds.ops import (AnchorGenerator, BoxCoder, Matcher, batched_nms, box_iou,
                         generalized_box_iou, nms, pairwise_giou, sample_balanced)


def _random_boxes(n, size=100.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * size
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * size * 0.4 + 0.5
    return torch.cat([xy, xy + wh], dim=1)


def _naive_iou(a, b):
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def _naive_giou(a, b):
    iou = _naive_iou(a, b)
    inter_union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = inter_union - iw * ih
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return iou - (hull - union) / hull


def _greedy_nms(boxes, scores, thr, classes=None):
    """Textbook greedy NMS: python lists, one candidate at a time."""
    b = boxes.tolist()
    s = scores.tolist()
    c = classes.tolist() if classes is not None else [0] * len(b)
    order = sorted(range(len(b)), key=lambda i: (-s[i], i))
    keep = []
    for i in order:
        if all(c[k] != c[i] or _naive_iou(b[k], b[i]) <= thr for k in keep):
            keep.append(i)
    return keep


def test_box_iou_and_giou_match_naive_loops():
    a, b = _random_boxes(23, seed=1), _random_boxes(17, seed=2)
    iou, giou = box_iou(a, b), generalized_box_iou(a, b)
    for i in range(len(a)):
        for j in range(len(b)):
            assert iou[i, j].item() == pytest.approx(_naive_iou(a[i].tolist(), b[j].tolist()), abs=1e-12)
            assert giou[i, j].item() == pytest.approx(_naive_giou(a[i].tolist(), b[j].tolist()), abs=1e-12)
    pg = pairwise_giou(a[:17], b)
    for i in range(17):
        assert pg[i].item() == pytest.approx(_naive_giou(a[i].tolist(), b[i].tolist()), abs=1e-6)
    # degenerate boxes give 0, not NaN
    z = torch.zeros(2, 4, dtype=torch.float64)
    assert torch.equal(box_iou(z, z), torch.zeros(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("n,thr,seed", [(0, 0.5, 0), (1, 0.5, 0), (60, 0.5, 3), (300, 0.3, 4),
                                        (300, 0.7, 5), (500, 0.1, 6)])
def test_nms_equals_greedy_reference(n, thr, seed):
    boxes = _random_boxes(n, seed=seed, dtype=torch.float32)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed + 100))
    if n > 10:
        scores[:5] = scores[5]  # exercise ties: lower index must win
    assert nms(boxes, scores, thr).tolist() == _greedy_nms(boxes, scores, thr)


def test_nms_blocks_agree_with_single_block(monkeypatch):
    import importlib
    nms_module = importlib.import_module("agvm_ds.ops.nms")
    boxes = _random_boxes(400, seed=9, dtype=torch.float32)
    scores = torch.rand(400, generator=torch.Generator().manual_seed(10))
    expected = _greedy_nms(boxes, scores, 0.4)
    monkeypatch.setattr(nms_module, "BLOCK", 37)
    assert nms_module.nms(boxes, scores, 0.4).tolist() == expected


def test_batched_nms_is_per_class():
    boxes = _random_boxes(250, seed=11, dtype=torch.float32)
    scores = torch.rand(250, generator=torch.Generator().manual_seed(12))
    classes = torch.randint(0, 4, (250,), generator=torch.Generator().manual_seed(13))
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == _greedy_nms(boxes, scores, 0.5, classes)
    # identical boxes of different classes both survive
    same = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    assert sorted(batched_nms(same, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5).tolist()) == [0, 1]


def test_box_coder_roundtrip_and_anchor_layout():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref, gt = _random_boxes(50, seed=20), _random_boxes(50, seed=21)
    assert torch.allclose(coder.decode(coder.encode(ref, gt).double(), ref), gt, atol=1e-4)
    gen = AnchorGenerator([[32.0], [64.0]], [0.5, 1.0, 2.0], [8, 16], offset=0.5)
    feats = [torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 2, 2)]
    a0, a1 = gen(feats)
    assert a0.shape == (3 * 4 * 3, 4) and a1.shape == (2 * 2 * 3, 4)
    # (y, x, anchor) order: entry for y=1, x=2, ratio index 1 (square 32x32) centred at (20, 12)
    box = a0[(1 * 4 + 2) * 3 + 1]
    assert torch.allclose(box, torch.tensor([20 - 16.0, 12 - 16.0, 20 + 16.0, 12 + 16.0]))
    wh = a0[:3, 2:] - a0[:3, :2]
    assert torch.allclose(wh[:, 1] / wh[:, 0], torch.tensor([0.5, 1.0, 2.0]))  # ratio = h / w
    assert torch.allclose(wh.prod(1), torch.full((3,), 32.0 ** 2))


def test_matcher_and_sampler():
    iou = torch.tensor([[0.9, 0.45, 0.2, 0.1], [0.1, 0.3, 0.35, 0.05]])
    idx, labels = Matcher(0.5, 0.4)(iou)
    assert labels.tolist() == [1, -1, 0, 0] and idx.tolist()[:3] == [0, 0, 1]
    _, labels = Matcher(0.5, 0.4, allow_low_quality=True)(iou)
    assert labels.tolist() == [1, -1, 1, 0]  # gt 1's best match is claimed
    lab = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5)
    pos, neg = sample_balanced(lab, 16, 0.25)
    assert len(pos) == 4 and len(neg) == 12
    assert (lab[pos] == 1).all() and (lab[neg] == 0).all()


def test_batched_nms_split_path_matches(monkeypatch):
    import importlib
    nms_module = importlib.import_module("agvm_ds.ops.nms")
    boxes = _random_boxes(300, seed=14, dtype=torch.float32)
    scores = torch.rand(300, generator=torch.Generator().manual_seed(15))
    scores[10:20] = scores[5]  # ties across categories
    classes = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(16))
    monkeypatch.setattr(nms_module, "SPLIT_ABOVE", 10)
    assert nms_module.batched_nms(boxes, scores, classes, 0.45).tolist() == \
        _greedy_nms(boxes, scores, 0.45, classes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_with_ties_duplicates_and_exact_threshold_ious(seed, monkeypatch):
    """Integer boxes on a coarse grid: exact duplicates, IoUs exactly at the threshold (not
    suppressed: the rule is strictly greater) and only four distinct scores (ties everywhere)."""
    g = torch.Generator().manual_seed(seed)
    n = 400
    xy = torch.randint(0, 8, (n, 2), generator=g).float() * 2
    wh = torch.randint(1, 5, (n, 2), generator=g).float() * 2
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.randint(0, 4, (n,), generator=g).float() / 4
    classes = torch.randint(0, 3, (n,), generator=g)
    import importlib
    nms_module = importlib.import_module("agvm_ds.ops.nms")
    exact = [(i, j) for i in range(40) for j in range(i) if _naive_iou(boxes[i].tolist(), boxes[j].tolist()) == 0.5]
    assert exact, "the case should contain pairs with IoU exactly 0.5"
    for thr in (0.5, 0.25, 0.0):
        assert nms(boxes, scores, thr).tolist() == _greedy_nms(boxes, scores, thr)
        ref = _greedy_nms(boxes, scores, thr, classes)
        assert batched_nms(boxes, scores, classes, thr).tolist() == ref  # one masked pass
        with monkeypatch.context() as m:
            m.setattr(nms_module, "SPLIT_ABOVE", 10)  # one pass per category, then merged
            assert nms_module.batched_nms(boxes, scores, classes, thr).tolist() == ref
