"""RetinaNet head (Lin et al. 2017): dense per-anchor classification and box regression.

Two towers of 3x3 convs shared across pyramid levels; sigmoid classifiers trained with
focal loss, whose bias starts at ``-log((1 - p) / p)`` so every anchor initially predicts
background with probability ``1 - p`` (otherwise the ~10^4 background anchors swamp the
first iterations). Matching and loss are vectorized over anchors and over the images of
a batch (ground truth padded to the largest count); the only Python loops in training are
over pyramid levels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from agvm_ds.models.heads.anchors import anchor_generator
from agvm_ds.models.layers import make_norm
from agvm_ds.ops import BoxCoder, Matcher, batched_nms, box_iou, giou_loss, smooth_l1_loss
from agvm_ds.ops.losses import focal_loss_from_labels

__all__ = ["RetinaHead"]


def _tower(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        # in place: neither a conv (without norm) nor a norm needs its output for backward,
        # and ReLU's backward reads its own result, so autograd allows it; one tensor fewer
        # per layer and level, as in torchvision's head
        layers += [nn.Conv2d(channels, channels, 3, padding=1), make_norm(norm, channels),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _flatten(x: Tensor, k: int) -> Tensor:
    """``[N, A*k, H, W]`` -> ``[N, H*W*A, k]`` (the anchor generator's order), in fp32.

    Losses and box decoding run in fp32 even when the network runs in bf16/fp16: bf16's
    8-bit mantissa would put box coordinates off by pixels on large images.
    """
    n, _, h, w = x.shape
    return x.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k).float()


class RetinaHead(nn.Module):
    def __init__(self, spec, channels: int, strides: list[int], num_classes: int):
        super().__init__()
        self.spec = spec
        self.num_classes = num_classes
        self.anchors = anchor_generator(spec.anchors, strides)
        a = self.anchors.num_anchors[0]
        self.cls_tower = _tower(channels, spec.num_convs, spec.norm)
        self.box_tower = _tower(channels, spec.num_convs, spec.norm)
        self.cls_logits = nn.Conv2d(channels, a * num_classes, 3, padding=1)
        self.box_deltas = nn.Conv2d(channels, a * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - spec.prior_prob) / spec.prior_prob))
        self.coder = BoxCoder()
        self.matcher = Matcher(spec.fg_iou, spec.bg_iou, spec.allow_low_quality)
        # EMA of foreground anchors per image batch (detectron2's trick against noisy
        # per-batch counts); starts at the first batch's count (-1 = not yet seen). A buffer,
        # so checkpoints carry it and a resumed run normalizes its loss exactly as before;
        # averaged over data-parallel ranks so every rank scales its loss the same way.
        self.register_buffer("loss_normalizer", torch.tensor(-1.0), persistent=True)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits = [_flatten(self.cls_logits(self.cls_tower(f)), self.num_classes) for f in feats]
        deltas = [_flatten(self.box_deltas(self.box_tower(f)), 4) for f in feats]
        return logits, deltas

    def losses(self, feats: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        logits, deltas = self(feats)
        anchors = torch.cat(self.anchors(feats))
        logits, deltas = torch.cat(logits, dim=1), torch.cat(deltas, dim=1)
        gt, gt_labels, gt_valid = _pad_targets(targets, anchors.dtype)
        # one matching for the whole batch: [B, G, P] IoU, padding rows masked out
        idx, lab = self.matcher(box_iou(gt, anchors), gt_valid)
        # per anchor: its gt's class (foreground), num_classes (background), -1 (ignored)
        labels = torch.where(lab == 1, gt_labels.gather(1, idx),
                             torch.where(lab == 0, self.num_classes, -1))
        fg = lab == 1
        # On the device, without a host sync: one small all-reduce per micro-batch.
        n = _mean_over_ranks(fg.sum().to(torch.float32)).clamp(min=1.0)
        prev = self.loss_normalizer.to(torch.float32)
        normalizer = torch.where(prev < 0, n, 0.9 * prev + 0.1 * n)
        self.loss_normalizer.copy_(normalizer)
        s = self.spec
        loss_cls = focal_loss_from_labels(logits, labels, s.focal_alpha, s.focal_gamma)
        # the foreground anchors once, as (image, anchor) index pairs shared by every gather
        img, anc = fg.nonzero(as_tuple=True)
        pred, anc_boxes, gt_boxes = deltas[img, anc], anchors[anc], gt[img, idx[img, anc]]
        if s.box_loss == "giou":
            loss_box = giou_loss(self.coder.decode(pred, anc_boxes), gt_boxes)
        else:
            loss_box = smooth_l1_loss(pred, self.coder.encode(anc_boxes, gt_boxes), s.smooth_l1_beta)
        return {"loss_cls": loss_cls / normalizer, "loss_box": loss_box / normalizer}

    def inference(self, feats: list[Tensor], sizes: list[tuple[int, int]]) -> list[dict]:
        logits, deltas = self(feats)
        anchors = self.anchors(feats)
        s, k = self.spec, self.num_classes
        results = []
        for i in range(len(sizes)):
            all_boxes, all_scores, all_cls = [], [], []
            for lg, dl, an in zip(logits, deltas, anchors):
                scores = lg[i].sigmoid().flatten()
                keep = torch.nonzero(scores > s.score_thresh).squeeze(1)
                if len(keep) > s.topk_candidates:
                    keep = keep[scores[keep].topk(s.topk_candidates).indices]
                a_idx, cls = keep // k, keep % k
                all_boxes.append(self.coder.decode(dl[i][a_idx], an[a_idx]))
                all_scores.append(scores[keep])
                all_cls.append(cls)
            boxes, scores, cls = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_cls)
            keep = batched_nms(boxes, scores, cls, s.nms_thresh)[: s.max_detections]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": cls[keep]})
        return results


def _pad_targets(targets: list[dict], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's ground truth padded to its largest count: boxes ``[B, G, 4]``, labels
    ``[B, G]``, and which rows are real ``[B, G]``; ``G >= 1`` so every gather has a row
    to read (an image, or a batch, without objects has only padding)."""
    boxes = [t["boxes"].to(dtype).reshape(-1, 4) for t in targets]
    counts = [len(b) for b in boxes]
    g = max(1, max(counts, default=0))
    device = boxes[0].device
    gt = boxes[0].new_zeros(len(boxes), g, 4)
    labels = torch.zeros(len(boxes), g, dtype=torch.int64, device=device)
    for i, (b, t) in enumerate(zip(boxes, targets)):
        gt[i, : counts[i]] = b
        labels[i, : counts[i]] = t["labels"]
    valid = torch.arange(g, device=device) < torch.tensor(counts, device=device).unsqueeze(1)
    return gt, labels, valid


def _mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of a scalar tensor over the data-parallel ranks (no gradient flows through
    it: it is a normalizer); itself when not distributed."""
    from agvm_ds import collectives

    if collectives.world() == 1:
        return value
    return collectives.all_reduce_mean(value.detach().clone()).to(value.device)
