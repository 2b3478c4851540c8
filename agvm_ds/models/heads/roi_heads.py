"""Fast R-CNN box head and Mask R-CNN mask head on RoI-pooled FPN features.

Box head (detectron2's "FastRCNNConvFCHead" + output layers): optional convs, then FCs,
then a (K + 1)-way softmax classifier (index K = background) and class-specific box
deltas. Training appends the ground-truth boxes to the proposals (so early on, when
proposals are poor, the head still sees positives), matches at IoU 0.5 and samples 512
RoIs per image, a quarter foreground at most.

Mask head: four 3x3 convs, a 2x transposed conv and a per-class 1x1 predictor giving
``2S x 2S`` mask logits; only the ground-truth class's channel is trained (binary
cross-entropy against RoIAligned ground-truth masks), so classes do not compete. A
micro-batch without a foreground RoI still runs the mask head (one dummy RoI, zero weight):
every rank runs every head every step, which ZeRO-3's parameter gathers need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agvm_ds.models.heads.pooler import MultiScaleRoIAlign
from agvm_ds.models.layers import make_norm
from agvm_ds.ops import (BoxCoder, Matcher, batched_nms, box_iou, clip_boxes, mask_targets,
                         nonempty_boxes, sample_balanced, smooth_l1_loss)

__all__ = ["ROIBoxHead", "ROIMaskHead"]


def _conv_stack(cin: int, dim: int, num: int, norm: str) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for _ in range(num):
        layers += [nn.Conv2d(cin, dim, 3, padding=1, bias=norm in (None, "none")),
                   make_norm(norm, dim), nn.ReLU()]
        cin = dim
    return nn.Sequential(*layers), cin


class ROIBoxHead(nn.Module):
    def __init__(self, spec, channels: int, strides: list[int], num_classes: int):
        super().__init__()
        self.spec, self.num_classes = spec, num_classes
        self.pooler = MultiScaleRoIAlign(strides, spec.pooler_resolution, spec.sampling_ratio,
                                         spec.canonical_box_size, spec.canonical_level)
        self.convs, c = _conv_stack(channels, spec.conv_dim, spec.num_convs, spec.norm)
        fcs: list[nn.Module] = []
        dim = c * spec.pooler_resolution ** 2
        for _ in range(spec.num_fcs):
            fcs += [nn.Linear(dim, spec.fc_dim), nn.ReLU()]
            dim = spec.fc_dim
        self.fcs = nn.Sequential(*fcs)
        self.cls_score = nn.Linear(dim, num_classes + 1)
        self.box_deltas = nn.Linear(dim, 4 * (1 if spec.cls_agnostic_box else num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.box_deltas.weight, std=0.001)
        self.coder = BoxCoder(spec.box_weights)
        self.matcher = Matcher(spec.fg_iou, spec.fg_iou)

    def _head(self, feats, boxes) -> tuple[Tensor, Tensor]:
        x = self.convs(self.pooler(feats, boxes)).flatten(1)
        x = self.fcs(x)
        return self.cls_score(x).float(), self.box_deltas(x).float()  # fp32 losses/decoding

    @torch.no_grad()
    def sample(self, proposals: list[Tensor], targets: list[dict]):
        """Per image: sampled boxes, their class (K = background) and matched gt index."""
        s = self.spec
        boxes, classes, gt_idx = [], [], []
        for p, t in zip(proposals, targets):
            gt = t["boxes"].to(p.dtype)
            p = torch.cat([p, gt])
            idx, lab = self.matcher(box_iou(gt, p))
            cls = torch.full_like(idx, self.num_classes)
            if len(gt):
                cls[lab == 1] = t["labels"][idx[lab == 1]]
            pos, neg = sample_balanced(lab, s.batch_size_per_image, s.positive_fraction)
            keep = torch.cat([pos, neg])
            boxes.append(p[keep])
            classes.append(cls[keep])
            gt_idx.append(idx[keep])
        return boxes, classes, gt_idx

    def losses(self, feats, proposals, targets):
        boxes, classes, gt_idx = self.sample(proposals, targets)
        logits, deltas = self._head(feats, boxes)
        cls = torch.cat(classes)
        loss_cls = F.cross_entropy(logits, cls, reduction="mean")
        fg = torch.nonzero(cls < self.num_classes).squeeze(1)
        if len(fg):
            gt = torch.cat([t["boxes"].to(b.dtype)[i] if len(t["boxes"]) else b
                            for t, b, i in zip(targets, boxes, gt_idx)])
            ref = torch.cat(boxes)
            d = deltas.view(len(cls), -1, 4)
            d = d[fg, 0] if self.spec.cls_agnostic_box else d[fg, cls[fg]]
            loss_box = smooth_l1_loss(d, self.coder.encode(ref[fg], gt[fg]), self.spec.smooth_l1_beta)
            loss_box = loss_box / max(len(cls), 1)
        else:
            loss_box = deltas.sum() * 0.0
        losses = {"loss_cls": loss_cls, "loss_box": loss_box}
        fg_per_image = [(c < self.num_classes) for c in classes]
        return losses, ([b[m] for b, m in zip(boxes, fg_per_image)],
                        [c[m] for c, m in zip(classes, fg_per_image)],
                        [g[m] for g, m in zip(gt_idx, fg_per_image)])

    def inference(self, feats, proposals, sizes) -> list[dict]:
        s, k = self.spec, self.num_classes
        logits, deltas = self._head(feats, proposals)
        probs = F.softmax(logits, dim=1)[:, :k]
        counts = [len(p) for p in proposals]
        results = []
        for p, pr, d, size in zip(proposals, probs.split(counts), deltas.split(counts), sizes):
            # the per-box width from the deltas, not -1: an image with no proposal (an RPN that
            # kept none, seen at batch 512 in the pretrained study) has zero rows to infer it from
            boxes = self.coder.decode(d, p).view(len(p), d.shape[-1] // 4, 4)
            boxes = clip_boxes(boxes, size).expand(len(p), k, 4)
            keep = torch.nonzero(pr > s.score_thresh)  # [m, 2]: (proposal, class)
            b = boxes[keep[:, 0], keep[:, 1]]
            sc, cl = pr[keep[:, 0], keep[:, 1]], keep[:, 1]
            ok = nonempty_boxes(b)
            b, sc, cl = b[ok], sc[ok], cl[ok]
            sel = batched_nms(b, sc, cl, s.nms_thresh)[: s.max_detections]
            results.append({"boxes": b[sel], "scores": sc[sel], "labels": cl[sel]})
        return results


class ROIMaskHead(nn.Module):
    def __init__(self, spec, channels: int, strides: list[int], num_classes: int, box_spec):
        super().__init__()
        self.spec, self.num_classes = spec, num_classes
        self.pooler = MultiScaleRoIAlign(strides, spec.pooler_resolution, spec.sampling_ratio,
                                         box_spec.canonical_box_size, box_spec.canonical_level)
        self.convs, c = _conv_stack(channels, spec.conv_dim, spec.num_convs, spec.norm)
        self.upsample = nn.ConvTranspose2d(c, spec.conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(spec.conv_dim, num_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias) if m.bias is not None else None
        nn.init.normal_(self.predictor.weight, std=0.001)

    def _logits(self, feats, boxes: list[Tensor], classes: Tensor) -> Tensor:
        x = self.convs(self.pooler(feats, boxes))
        x = self.predictor(F.relu(self.upsample(x)))
        return x[torch.arange(len(classes), device=x.device), classes].float()

    def losses(self, feats, fg_boxes, fg_classes, fg_gt_idx, targets) -> dict[str, Tensor]:
        classes = torch.cat(fg_classes)
        if len(classes) == 0:
            # No foreground RoI in this micro-batch: run the head anyway, on one dummy RoI,
            # with a zero weight. Every rank must run the same modules' forward every step:
            # ZeRO-3 gathers a module's parameters in its forward hook, so a rank that skips
            # the head while another runs it waits in a different collective (a hang); and
            # the gradient is an exact zero, the same as no loss at all.
            s = float(feats[0].shape[-1])
            dummy = [feats[0].new_tensor([[0.0, 0.0, s, s]])] + [feats[0].new_zeros(0, 4)
                                                                for _ in fg_boxes[1:]]
            logits = self._logits(feats, dummy, classes.new_zeros(1))
            return {"loss_mask": logits.sum() * 0.0}
        logits = self._logits(feats, fg_boxes, classes)
        size = logits.shape[-1]
        tgt = torch.cat([mask_targets(t["masks"], g, b, size)
                         for t, b, g in zip(targets, fg_boxes, fg_gt_idx)])
        return {"loss_mask": F.binary_cross_entropy_with_logits(logits, tgt)}

    def inference(self, feats, detections: list[dict]) -> list[Tensor]:
        """Mask probabilities ``[k, 2S, 2S]`` for each image's detections."""
        boxes = [d["boxes"] for d in detections]
        classes = torch.cat([d["labels"] for d in detections])
        if len(classes) == 0:
            s = 2 * self.spec.pooler_resolution
            return [feats[0].new_zeros(0, s, s) for _ in detections]
        probs = self._logits(feats, boxes, classes).sigmoid()
        return list(probs.split([len(b) for b in boxes]))
