"""Multi-scale RoIAlign: pool each box from the pyramid level that suits its size.

FPN's rule: level ``floor(k0 + log2(sqrt(area) / s0))`` (``s0 = 224`` on level ``k0 = 4``),
clamped to the available levels, so a box is pooled where it covers a comparable number of
feature cells whatever its size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from agvm_ds.ops import box_area, roi_align

__all__ = ["MultiScaleRoIAlign"]


class MultiScaleRoIAlign(nn.Module):
    def __init__(self, strides: list[int], output_size: int, sampling_ratio: int,
                 canonical_box_size: float = 224.0, canonical_level: int = 4):
        super().__init__()
        levels = [math.log2(s) for s in strides]
        if any(abs(lv - round(lv)) > 1e-6 for lv in levels):
            raise ValueError(f"pooler: strides must be powers of two, got {strides}")
        self.min_level, self.max_level = int(round(levels[0])), int(round(levels[-1]))
        self.scales = [1.0 / s for s in strides]
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level

    def assign_levels(self, boxes: Tensor) -> Tensor:
        size = box_area(boxes).sqrt()
        lvl = torch.floor(self.canonical_level + torch.log2(size / self.canonical_box_size + 1e-8))
        return lvl.clamp(self.min_level, self.max_level).long() - self.min_level

    def forward(self, feats: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """``feats`` (one per stride) and per-image boxes -> ``[sum k_i, C, S, S]``."""
        feats = feats[: len(self.scales)]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        c = feats[0].shape[1]
        out = feats[0].new_zeros(rois.shape[0], c, self.output_size, self.output_size)
        if rois.shape[0] == 0:
            return out + sum(f.sum() * 0.0 for f in feats)  # keep every level in the graph
        levels = self.assign_levels(rois[:, 1:])
        for lvl, (f, scale) in enumerate(zip(feats, self.scales)):
            sel = torch.nonzero(levels == lvl).squeeze(1)
            if len(sel):
                out = out.index_copy(0, sel, roi_align(f, rois[sel], self.output_size,
                                                       scale, self.sampling_ratio, aligned=True))
        return out
