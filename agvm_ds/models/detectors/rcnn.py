"""Faster R-CNN and Mask R-CNN on an FPN.

AGVM modules: backbone, neck, rpn, roi_box (+ roi_mask). The RPN sees every pyramid level
(including a max-pooled extra level, if the neck has one); the RoI heads pool only from the
backbone's own levels, as in the FPN paper.
"""

from __future__ import annotations

import torch

from agvm_ds.models.detectors.base import (DenseModel, image_sizes, original_size,
                                           to_original_boxes)
from agvm_ds.models.heads.roi_heads import ROIBoxHead, ROIMaskHead
from agvm_ds.models.heads.rpn import RPN
from agvm_ds.ops import paste_masks

__all__ = ["FasterRCNN", "MaskRCNN"]


class FasterRCNN(DenseModel):
    def __init__(self, spec):
        super().__init__(spec)
        ch = spec.neck.out_channels
        self.rpn = RPN(spec.rpn, ch, self.neck.strides)
        self.roi_strides = self.backbone.strides
        self.roi_box = ROIBoxHead(spec.roi_box, ch, self.roi_strides, spec.num_classes)

    def losses(self, feats, images, targets):
        sizes = image_sizes(images, targets)
        proposals, losses = self.rpn(feats, sizes, targets)
        box_losses, fg = self.roi_box.losses(feats, proposals, targets)
        losses.update(box_losses)
        losses.update(self._extra_losses(feats, fg, targets))
        return losses

    def _extra_losses(self, feats, fg, targets):
        return {}

    def _detect(self, feats, images, targets):
        sizes = image_sizes(images, targets)
        proposals, _ = self.rpn(feats, sizes)
        return self.roi_box.inference(feats, proposals, sizes), sizes

    def inference(self, feats, images, targets):
        dets, sizes = self._detect(feats, images, targets)
        for i, d in enumerate(dets):
            d["boxes"] = to_original_boxes(d["boxes"], targets[i] if targets else None, sizes[i])
        return dets


class MaskRCNN(FasterRCNN):
    def __init__(self, spec):
        super().__init__(spec)
        self.roi_mask = ROIMaskHead(spec.roi_mask, spec.neck.out_channels, self.roi_strides,
                                    spec.num_classes, spec.roi_box)

    def _extra_losses(self, feats, fg, targets):
        for t in targets:
            if "masks" not in t:
                raise ValueError("Mask R-CNN training needs 'masks' in every target")
        return self.roi_mask.losses(feats, *fg, targets)

    def inference(self, feats, images, targets):
        dets, sizes = self._detect(feats, images, targets)
        probs = self.roi_mask.inference(feats, dets)
        thr = self.spec.roi_mask.mask_threshold
        for i, (d, p) in enumerate(zip(dets, probs)):
            t = targets[i] if targets else None
            d["boxes"] = to_original_boxes(d["boxes"], t, sizes[i])
            h0, w0 = original_size(t, sizes[i])
            if t is not None and bool(t.get("flipped", False)):
                p = torch.flip(p, dims=[-1])  # the box was un-flipped; flip its mask grid too
            d["masks"] = paste_masks(p, d["boxes"], h0, w0) > thr
        return dets
