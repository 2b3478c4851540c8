"""Semantic FPN: backbone + FPN + decode head. AGVM modules: backbone, neck, decode."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agvm_ds.models.detectors.base import DenseModel, image_sizes, original_size
from agvm_ds.models.heads.semantic import SemanticFPNHead

__all__ = ["SemanticFPN"]


class SemanticFPN(DenseModel):
    def __init__(self, spec):
        super().__init__(spec)
        strides = self.neck.strides
        use = [i for i, s in enumerate(strides) if s >= spec.decode.common_stride]
        if not use:
            raise ValueError(f"decode.common_stride {spec.decode.common_stride} is above every "
                             f"neck stride {strides}")
        self.levels = use
        self.decode = SemanticFPNHead(spec.decode, spec.neck.out_channels,
                                      [strides[i] for i in use], spec.num_classes)

    def losses(self, feats, images, targets):
        hp, wp = images.shape[-2:]
        ignore = self.spec.decode.ignore_value
        sem = torch.full((len(targets), hp, wp), ignore, dtype=torch.int64, device=images.device)
        for i, t in enumerate(targets):
            if "sem_seg" not in t:
                raise ValueError("Semantic FPN training needs 'sem_seg' in every target")
            h, w = t["sem_seg"].shape[-2:]
            sem[i, :h, :w] = t["sem_seg"]  # padding stays ignored
        return self.decode.losses([feats[i] for i in self.levels], sem)

    def inference(self, feats, images, targets):
        sizes = image_sizes(images, targets)
        logits = self.decode([feats[i] for i in self.levels], images.shape[-2:])
        out = []
        for i, (h, w) in enumerate(sizes):
            t = targets[i] if targets else None
            x = logits[i:i + 1, :, :h, :w]
            if t is not None and bool(t.get("flipped", False)):
                x = torch.flip(x, dims=[-1])
            h0, w0 = original_size(t, (h, w))
            if (h0, w0) != (h, w):
                x = F.interpolate(x, size=(h0, w0), mode="bilinear", align_corners=False)
            out.append({"sem_seg": x[0].argmax(0)})
        return out
