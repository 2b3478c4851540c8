"""The RetinaNet training path's batched / fused pieces against plain per-image references.

The head matches a whole batch at once (ground truth padded, ``Matcher`` on ``[B, G, P]``),
forms the focal loss from integer labels with a hand-written gradient, and runs its towers
and the FPN top-down sum in place. Each is checked here on fresh random data against the
textbook computation: loops over images, anchors and ground-truth boxes, a one-hot target
tensor, autograd through the formula, out-of-place activations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agvm_ds.config.spec import load_spec
from agvm_ds.models.heads.retina import RetinaHead
from agvm_ds.models.necks.fpn import FPN
from agvm_ds.ops import Matcher, box_iou, smooth_l1_loss
from agvm_ds.ops.losses import focal_loss_from_labels, sigmoid_focal_loss


def random_boxes(g: torch.Generator, n: int, size: float = 64.0, dtype=torch.float64) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * size
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


def naive_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pair by pair, in the boxes' own precision (numpy scalars of that dtype), with the
    library's order of operations: the low-quality rule compares IoUs for exact equality,
    so a reference in another precision would break ties differently."""
    dt = np.dtype(str(a.dtype).replace("torch.", ""))
    zero = dt.type(0)
    out = np.zeros((len(a), len(b)), dtype=dt)
    for i, (ax1, ay1, ax2, ay2) in enumerate(a.numpy()):
        for j, (bx1, by1, bx2, by2) in enumerate(b.numpy()):
            iw, ih = max(zero, min(ax2, bx2) - max(ax1, bx1)), max(zero, min(ay2, by2) - max(ay1, by1))
            inter = iw * ih
            area_a = max(zero, ax2 - ax1) * max(zero, ay2 - ay1)
            area_b = max(zero, bx2 - bx1) * max(zero, by2 - by1)
            union = (area_a + area_b) - inter
            out[i, j] = inter / union if union > 0 else zero
    return torch.from_numpy(out)


def naive_match(iou: torch.Tensor, high: float, low: float, low_quality: bool):
    """One image, real rows only: the matcher's rules written out per prediction."""
    g, p = iou.shape
    idx, lab = [0] * p, [0] * p
    if g == 0:
        return idx, lab
    rows = iou.tolist()
    per_gt = [max(r) for r in rows]
    for j in range(p):
        col = [rows[i][j] for i in range(g)]
        best = max(col)
        idx[j] = col.index(best)  # first maximum, as torch.max
        lab[j] = 1 if best >= high else (-1 if best >= low else 0)
        if low_quality and any(per_gt[i] > 0 and rows[i][j] == per_gt[i] for i in range(g)):
            lab[j] = 1
    return idx, lab


def test_box_iou_batched_matches_loops():
    g = torch.Generator().manual_seed(1)
    gt = torch.stack([random_boxes(g, 3) for _ in range(2)])  # [2, 3, 4]
    anchors = random_boxes(g, 17)
    anchors[4] = anchors[4, [0, 1, 0, 1]]  # a zero-area anchor: IoU 0, not NaN
    iou = box_iou(gt, anchors)
    assert iou.shape == (2, 3, 17)
    for b in range(2):
        torch.testing.assert_close(iou[b], naive_iou(gt[b], anchors), rtol=1e-12, atol=1e-12)
    assert (iou[:, :, 4] == 0).all()


@pytest.mark.parametrize("low_quality", [True, False])
def test_matcher_batched_with_padding_matches_per_image_rules(low_quality):
    g = torch.Generator().manual_seed(2)
    counts = [3, 0, 1]  # the middle image has no ground truth: only padding
    anchors = random_boxes(g, 40)
    gts = [random_boxes(g, n) for n in counts]
    gts[0][1] = anchors[7]  # an exact match (IoU 1) and, below, a tie between two anchors
    gts[2][0] = (anchors[3] + anchors[5]) / 2
    pad = torch.zeros(len(counts), max(counts), 4, dtype=torch.float64)
    valid = torch.zeros(len(counts), max(counts), dtype=torch.bool)
    for i, b in enumerate(gts):
        pad[i, : len(b)], valid[i, : len(b)] = b, True
    pad[1, 0] = anchors[0]  # padding that would match perfectly if it were not masked
    matcher = Matcher(0.5, 0.4, allow_low_quality=low_quality)
    idx, lab = matcher(box_iou(pad, anchors), valid)
    assert idx.shape == lab.shape == (3, 40) and lab.dtype == torch.int8
    for i, b in enumerate(gts):
        ref_idx, ref_lab = naive_match(naive_iou(b, anchors), 0.5, 0.4, low_quality)
        assert lab[i].tolist() == ref_lab
        fg = [j for j, v in enumerate(ref_lab) if v == 1]
        assert [idx[i, j].item() for j in fg] == [ref_idx[j] for j in fg]
    assert (lab[1] == 0).all() and (idx[1] == 0).all()
    assert (lab[0] == 1).any() and (lab[0] == 0).any()


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.4, 0.0), (0.25, 1.5)])
def test_focal_from_labels_matches_one_hot_autograd(alpha, gamma):
    g = torch.Generator().manual_seed(3)
    k = 7
    logits = (torch.randn(2, 50, k, generator=g, dtype=torch.float64) * 4).requires_grad_()
    with torch.no_grad():
        logits[0, :3] = torch.tensor([30.0, -30.0, 18.0], dtype=torch.float64)[:, None]  # saturated
    labels = torch.randint(-1, k + 1, (2, 50), generator=g)  # -1 ignored, k background
    labels[0, :3] = torch.tensor([2, 2, -1])
    loss = focal_loss_from_labels(logits, labels, alpha, gamma)
    (grad,) = torch.autograd.grad(3.0 * loss, logits)

    ref_logits = logits.detach().clone().requires_grad_()
    valid = labels >= 0
    onehot = torch.zeros(int(valid.sum()), k, dtype=torch.float64)
    for r, c in enumerate(labels[valid].tolist()):
        if c < k:
            onehot[r, c] = 1.0
    ref = sigmoid_focal_loss(ref_logits[valid], onehot, alpha, gamma)
    (ref_grad,) = torch.autograd.grad(3.0 * ref, ref_logits)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert (grad[labels < 0] == 0).all()


def test_focal_from_labels_fp32_and_shape_check():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 400, 80, generator=g).requires_grad_()
    labels = torch.randint(-1, 81, (3, 400), generator=g)
    loss = focal_loss_from_labels(logits, labels)
    loss.backward()
    ref_logits = logits.detach().double().requires_grad_()
    valid = labels >= 0
    onehot = F.one_hot(labels[valid], 81)[:, :80].double()
    ref = sigmoid_focal_loss(ref_logits[valid], onehot)
    ref.backward()
    assert loss.dtype == logits.grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="do not match"):
        focal_loss_from_labels(logits, labels[:, :10])


def tower_reference(tower, x):
    """A head tower, conv -> norm -> out-of-place ReLU per layer (the modules' own weights)."""
    for i in range(0, len(tower), 3):
        x = F.relu(tower[i + 1](tower[i](x)))
    return x


def naive_decode(d, a, weights, clamp):
    """One xyxy box from deltas ``(dx, dy, dw, dh)`` on anchor ``a``: centre shifted by
    ``dx * width``, sides scaled by ``exp(dw)``, each delta divided by its weight, ``dw`` and
    ``dh`` capped at ``clamp`` (log(1000/16), as in Detectron)."""
    wx, wy, ww, wh = weights
    aw, ah = a[2] - a[0], a[3] - a[1]
    cx, cy = a[0] + aw / 2 + d[0] / wx * aw, a[1] + ah / 2 + d[1] / wy * ah
    w = torch.exp(torch.clamp(d[2] / ww, max=clamp)) * aw
    h = torch.exp(torch.clamp(d[3] / wh, max=clamp)) * ah
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def naive_giou_pair(p, q):
    """GIoU of two xyxy boxes from the definition: IoU minus the hull's uncovered fraction."""
    iw = (torch.minimum(p[2], q[2]) - torch.maximum(p[0], q[0])).clamp(min=0)
    ih = (torch.minimum(p[3], q[3]) - torch.maximum(p[1], q[1])).clamp(min=0)
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    hull = (torch.maximum(p[2], q[2]) - torch.minimum(p[0], q[0])) * (
        torch.maximum(p[3], q[3]) - torch.minimum(p[1], q[1]))
    return inter / union - (hull - union) / hull


def reference_losses(head, feats, targets):
    """RetinaNet's training loss written per image: naive IoU and matching, a one-hot
    target, autograd focal loss, smooth-L1 on the encoded foreground boxes."""
    k, s = head.num_classes, head.spec
    logits = torch.cat([head.cls_logits(tower_reference(head.cls_tower, f)).view(
        f.shape[0], -1, k, *f.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(f.shape[0], -1, k)
        for f in feats], 1)
    deltas = torch.cat([head.box_deltas(tower_reference(head.box_tower, f)).view(
        f.shape[0], -1, 4, *f.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(f.shape[0], -1, 4)
        for f in feats], 1)
    anchors = torch.cat(head.anchors(feats))
    loss_cls = loss_box = 0.0
    n_fg = 0
    for i, t in enumerate(targets):
        idx, lab = naive_match(naive_iou(t["boxes"], anchors), s.fg_iou, s.bg_iou, s.allow_low_quality)
        rows, onehot, fg = [], [], []
        for j, (g_, l_) in enumerate(zip(idx, lab)):
            if l_ >= 0:
                rows.append(j)
                onehot.append([1.0 if (l_ == 1 and c == int(t["labels"][g_])) else 0.0 for c in range(k)])
            if l_ == 1:
                fg.append((j, g_))
        loss_cls = loss_cls + sigmoid_focal_loss(logits[i, rows], torch.tensor(onehot, dtype=logits.dtype),
                                                 s.focal_alpha, s.focal_gamma)
        if fg:
            a, gi = [j for j, _ in fg], [g_ for _, g_ in fg]
            if s.box_loss == "giou":
                c = head.coder
                for d_, a_, q_ in zip(deltas[i, a], anchors[a], t["boxes"][gi].to(anchors.dtype)):
                    box = naive_decode(d_, a_, c.weights, c.scale_clamp)
                    loss_box = loss_box + 1 - naive_giou_pair(box, q_)
            else:
                target = head.coder.encode(anchors[a], t["boxes"][gi].to(anchors.dtype))
                loss_box = loss_box + smooth_l1_loss(deltas[i, a], target, s.smooth_l1_beta)
        n_fg += len(fg)
    return {"loss_cls": loss_cls / max(n_fg, 1), "loss_box": loss_box / max(n_fg, 1)}


@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou"])
def test_retina_head_losses_match_per_image_reference(box_loss):
    spec = load_spec("models/retinanet_uninet_tiny.json", {"head.box_loss": box_loss})
    assert spec.head.box_loss == box_loss
    torch.manual_seed(5)
    head = RetinaHead(spec.head, 16, [8, 16, 32], 5)
    for m in head.modules():  # larger weights than the init, so the towers' ReLUs clip
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.2)
    g = torch.Generator().manual_seed(6)
    feats = [torch.randn(3, 16, 64 // s, 64 // s, generator=g).requires_grad_() for s in (8, 16, 32)]
    boxes = random_boxes(g, 3, 56, torch.float32)
    # image 2 holds two of image 0's boxes in swapped order (with other classes): the same
    # anchors match, to other rows, so mixing up images' ground truth changes the losses
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 4, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
               {"boxes": boxes[[1, 0]] + 0.5, "labels": torch.tensor([3, 1])}]
    out = head.losses(feats, targets)
    ref = reference_losses(head, feats, targets)
    assert float(head.loss_normalizer) >= 1  # the first batch's foreground count
    for name in ("loss_cls", "loss_box"):
        torch.testing.assert_close(out[name], ref[name], rtol=1e-5, atol=1e-7)
    params = [p for p in head.parameters()] + feats
    got = torch.autograd.grad(out["loss_cls"] + out["loss_box"], params)
    want = torch.autograd.grad(ref["loss_cls"] + ref["loss_box"], params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fpn_in_place_top_down_matches_out_of_place():
    torch.manual_seed(7)
    fpn = FPN([8, 12, 16], [8, 16, 32], out_channels=8, extra_levels=2, norm="gn")
    g = torch.Generator().manual_seed(8)
    feats = [torch.randn(2, c, 40 // s * 2, 40 // s * 2, generator=g).requires_grad_()
             for c, s in zip([8, 12, 16], [4, 8, 16])]
    outs = fpn(feats)
    lat = [m(f) for m, f in zip(fpn.lateral, feats)]
    for i in (2, 1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
    ref = [m(x) for m, x in zip(fpn.output, lat)]
    ref += [fpn.extra[0](ref[-1])]
    ref += [fpn.extra[1](F.relu(ref[-1]))]
    weights = [torch.randn(o.shape, generator=g) for o in ref]
    params = list(fpn.parameters()) + feats
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), params)
    want = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref, weights)), params)
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
