"""Region Proposal Network (Ren et al. 2015) over an FPN, in detectron2's formulation.

A shared 3x3 conv + two 1x1 predictors score and refine ``A`` anchors per location on
every level. Training samples 256 anchors per image (half positive at most) for a binary
cross-entropy and an L1 box loss, both normalized by the number of sampled anchors over the
batch. Proposals: top-k per level by objectness, decoded, clipped, tiny boxes dropped, NMS
per level, then the best ``post_nms_topk`` over all levels; they carry no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agvm_ds.models.heads.anchors import anchor_generator
from agvm_ds.ops import (BoxCoder, Matcher, batched_nms, box_iou, clip_boxes, nonempty_boxes,
                         sample_balanced, smooth_l1_loss)

__all__ = ["RPN"]


class RPN(nn.Module):
    def __init__(self, spec, channels: int, strides: list[int]):
        super().__init__()
        self.spec = spec
        self.anchors = anchor_generator(spec.anchors, strides)
        a = self.anchors.num_anchors[0]
        convs: list[nn.Module] = []
        for _ in range(spec.num_convs):
            convs += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
        self.conv = nn.Sequential(*convs)
        self.objectness = nn.Conv2d(channels, a, 1)
        self.deltas = nn.Conv2d(channels, a * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        self.coder = BoxCoder()
        self.matcher = Matcher(spec.fg_iou, spec.bg_iou, allow_low_quality=True)

    def _predict(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        obj, dl = [], []
        for f in feats:
            x = self.conv(f)
            n, _, h, w = x.shape
            obj.append(self.objectness(x).permute(0, 2, 3, 1).reshape(n, -1).float())
            d = self.deltas(x)
            dl.append(d.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4).float())  # fp32 losses/decoding
        return obj, dl

    def forward(self, feats: list[Tensor], sizes: list[tuple[int, int]],
                targets: list[dict] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals per image (``[k, 4]``, detached) and, with targets, the RPN losses."""
        obj, deltas = self._predict(feats)
        anchors = self.anchors(feats)
        proposals = self._proposals(obj, deltas, anchors, sizes)
        losses = {} if targets is None else self._losses(obj, deltas, torch.cat(anchors), targets)
        return proposals, losses

    @torch.no_grad()
    def _proposals(self, obj, deltas, anchors, sizes) -> list[Tensor]:
        s = self.spec
        pre = s.pre_nms_topk_train if self.training else s.pre_nms_topk_test
        post = s.post_nms_topk_train if self.training else s.post_nms_topk_test
        n = obj[0].shape[0]
        boxes, scores, levels = [], [], []
        for lvl, (o, d, a) in enumerate(zip(obj, deltas, anchors)):
            k = min(pre, o.shape[1])
            top, idx = o.detach().topk(k, dim=1)  # [N, k]
            sel_d = torch.gather(d.detach(), 1, idx[..., None].expand(n, k, 4))
            boxes.append(self.coder.decode(sel_d.reshape(-1, 4), a[idx.reshape(-1)]).view(n, k, 4))
            scores.append(top)
            levels.append(torch.full((k,), lvl, dtype=torch.int64, device=o.device))
        boxes, scores, levels = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(levels)
        out = []
        for i, size in enumerate(sizes):
            b, sc = clip_boxes(boxes[i], size), scores[i]
            ok = nonempty_boxes(b, s.min_box_size) & torch.isfinite(sc)
            b, sc, lv = b[ok], sc[ok], levels[ok]
            keep = batched_nms(b, sc, lv, s.nms_thresh)[:post]
            out.append(b[keep])
        return out

    def _losses(self, obj, deltas, anchors, targets) -> dict[str, Tensor]:
        s = self.spec
        obj, deltas = torch.cat(obj, 1), torch.cat(deltas, 1)
        lab_all = torch.full(obj.shape, -1.0, device=obj.device)
        pos_d, pos_t = [], []
        for i, t in enumerate(targets):
            gt = t["boxes"].to(anchors.dtype)
            idx, lab = self.matcher(box_iou(gt, anchors))
            pos, neg = sample_balanced(lab, s.batch_size_per_image, s.positive_fraction)
            lab_all[i, pos] = 1.0
            lab_all[i, neg] = 0.0
            if len(pos):
                pos_d.append(deltas[i, pos])
                pos_t.append(self.coder.encode(anchors[pos], gt[idx[pos]]))
        norm = float(s.batch_size_per_image * len(targets))
        valid = lab_all >= 0
        loss_obj = F.binary_cross_entropy_with_logits(obj[valid], lab_all[valid], reduction="sum")
        if pos_d:
            loss_box = smooth_l1_loss(torch.cat(pos_d), torch.cat(pos_t), s.smooth_l1_beta)
        else:
            loss_box = deltas.sum() * 0.0
        w = s.loss_weight
        return {"loss_rpn_cls": w * loss_obj / norm, "loss_rpn_box": w * loss_box / norm}
