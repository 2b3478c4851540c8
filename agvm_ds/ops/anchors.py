"""Anchor generation: a fixed set of boxes per feature-map location, per pyramid level.

Level ``l`` (stride ``s_l``) gets ``A = len(sizes_l) * len(aspect_ratios)`` "cell" anchors
centred on the origin, shifted to every location ``((x + offset) * s_l, (y + offset) * s_l)``.
The flattening order is (y, x, anchor) so it matches a head output ``[N, A*K, H, W]``
permuted to ``[N, H, W, A, K]`` and reshaped to ``[N, H*W*A, K]``. Grids are cached by
(level, size, device, dtype) since the same sizes repeat batch after batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["AnchorGenerator", "cell_anchors"]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """``[len(sizes) * len(ratios), 4]`` xyxy boxes centred on 0 with area ``size**2``.

    ``aspect_ratio`` is height / width, as in detectron2 and torchvision.
    """
    out = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(out, dtype=torch.float32)


class AnchorGenerator(nn.Module):
    """Anchors for every level of a feature pyramid.

    Args:
        sizes: one list of anchor sizes (sqrt of area, input pixels) per level.
        aspect_ratios: height / width ratios shared by all levels.
        strides: the stride of each level.
        offset: where in a cell the anchor centre sits (0 = top-left corner, detectron2's
            default; 0.5 = cell centre).
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float],
                 strides: Sequence[int], offset: float = 0.0):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"AnchorGenerator: {len(sizes)} size lists for {len(strides)} levels")
        self.strides = [int(s) for s in strides]
        self.offset = float(offset)
        self._cells = [cell_anchors(s, aspect_ratios) for s in sizes]
        self._cache: dict = {}

    @property
    def num_anchors(self) -> list[int]:
        """Anchors per location, per level."""
        return [len(c) for c in self._cells]

    def grid_anchors(self, level: int, height: int, width: int, device, dtype=torch.float32) -> Tensor:
        key = (level, height, width, str(device), dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        stride = self.strides[level]
        ys = (torch.arange(height, dtype=torch.float32) + self.offset) * stride
        xs = (torch.arange(width, dtype=torch.float32) + self.offset) * stride
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
        anchors = (shifts + self._cells[level][None]).reshape(-1, 4).to(device=device, dtype=dtype)
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = anchors
        return anchors

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """One ``[H_l * W_l * A_l, 4]`` anchor tensor per level (same for every image)."""
        return [self.grid_anchors(i, f.shape[-2], f.shape[-1], f.device)
                for i, f in enumerate(features)]
