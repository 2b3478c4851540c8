"""RoIAlign (He et al., Mask R-CNN) in plain torch, with the exact semantics of torchvision's.

Each output bin averages ``sr_h x sr_w`` bilinear samples of the feature map. A sample whose
coordinate lies outside ``[-1, size]`` contributes 0; inside that range the coordinate is
clamped to ``[0, size - 1]`` before interpolating. Clamping-then-bilinear is exactly what
``F.grid_sample(padding_mode="border", align_corners=True)`` does, so the whole operation is
one ``grid_sample`` per image (fast C++/CUDA kernels with a backward for the features)
followed by a validity mask and a mean over the samples. No per-RoI Python loop.

``sampling_ratio <= 0`` means "adaptive": ``ceil(roi_size / output_size)`` samples per bin,
different for each RoI; those RoIs are grouped by their sample counts (few distinct values
in practice) and each group is sampled in one call.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["roi_align", "boxes_to_rois", "RoIAlign"]


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """``[k_i, 4]`` boxes per image -> ``[sum k_i, 5]`` rows ``(batch_index, x1, y1, x2, y2)``."""
    rows = [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
    if not rows:
        return torch.zeros(0, 5)
    return torch.cat(rows, dim=0)


def _sample_grid(rois: Tensor, out_h: int, out_w: int, sr_h: int, sr_w: int,
                 scale: float, aligned: bool) -> tuple[Tensor, Tensor]:
    """Sample coordinates ``y [K, out_h * sr_h]`` and ``x [K, out_w * sr_w]`` in pixels."""
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * scale - offset
    y1 = rois[:, 2] * scale - offset
    roi_w = rois[:, 3] * scale - offset - x1
    roi_h = rois[:, 4] * scale - offset - y1
    if not aligned:  # legacy behaviour: RoIs are at least one pixel large
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / out_w, roi_h / out_h
    # fraction of a bin at which each sample sits: (bin index + (sample index + .5) / sr)
    fy = torch.arange(out_h, device=rois.device, dtype=rois.dtype).repeat_interleave(sr_h) \
        + (torch.arange(sr_h, device=rois.device, dtype=rois.dtype).repeat(out_h) + 0.5) / sr_h
    fx = torch.arange(out_w, device=rois.device, dtype=rois.dtype).repeat_interleave(sr_w) \
        + (torch.arange(sr_w, device=rois.device, dtype=rois.dtype).repeat(out_w) + 0.5) / sr_w
    return y1[:, None] + fy[None] * bin_h[:, None], x1[:, None] + fx[None] * bin_w[:, None]


def _align_group(feat: Tensor, rois: Tensor, out_h: int, out_w: int, sr_h: int, sr_w: int,
                 scale: float, aligned: bool) -> Tensor:
    """RoIAlign of RoIs that all lie on image ``feat [C, H, W]`` and share one sample count."""
    c, h, w = feat.shape
    k = rois.shape[0]
    ys, xs = _sample_grid(rois.to(feat.dtype), out_h, out_w, sr_h, sr_w, scale, aligned)
    valid = ((ys >= -1) & (ys <= h))[:, :, None] & ((xs >= -1) & (xs <= w))[:, None, :]
    # pixel -> normalized coordinate for align_corners=True (a 1-pixel axis maps to 0)
    ny = ys * (2.0 / (h - 1)) - 1 if h > 1 else torch.zeros_like(ys)
    nx = xs * (2.0 / (w - 1)) - 1 if w > 1 else torch.zeros_like(xs)
    gh, gw = ny.shape[1], nx.shape[1]
    grid = torch.stack([nx[:, None, :].expand(k, gh, gw), ny[:, :, None].expand(k, gh, gw)], dim=-1)
    grid = grid.reshape(1, k * gh, gw, 2)
    sampled = F.grid_sample(feat[None], grid, mode="bilinear", padding_mode="border",
                            align_corners=True)  # [1, C, K * gh, gw]
    if not bool(valid.all()):
        sampled = sampled * valid.reshape(1, 1, k * gh, gw).to(sampled.dtype)
    # mean over each bin's sr_h x sr_w samples == average pooling with that window
    sampled = F.avg_pool2d(sampled, (sr_h, sr_w)) if sr_h * sr_w > 1 else sampled
    sampled = sampled.reshape(c, k, out_h, out_w)
    return sampled.permute(1, 0, 2, 3)


def roi_align(input: Tensor, rois: Tensor | Sequence[Tensor], output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Pool ``rois`` from ``input [N, C, H, W]`` into ``[K, C, out_h, out_w]``.

    ``rois`` is ``[K, 5]`` (batch index, x1, y1, x2, y2) in input-image pixels or a list of
    per-image ``[k_i, 4]`` boxes; ``spatial_scale`` maps them to the feature map
    (1 / stride). ``aligned=True`` shifts by half a pixel so a box maps onto the pixels it
    covers (detectron2's ROIAlignV2); ``aligned=False`` reproduces the original op.
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    if not isinstance(rois, Tensor):
        rois = boxes_to_rois(list(rois)).to(input.device, input.dtype)
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"roi_align: rois must be [K, 5], got {tuple(rois.shape)}")
    n, c = input.shape[:2]
    out = input.new_zeros(rois.shape[0], c, out_h, out_w)
    if rois.shape[0] == 0:
        return out
    rois = rois.detach()
    batch_idx = rois[:, 0].long()
    if sampling_ratio > 0:
        sr_h = torch.full_like(batch_idx, sampling_ratio)
        sr_w = sr_h
    else:
        rw = (rois[:, 3] - rois[:, 1]) * spatial_scale
        rh = (rois[:, 4] - rois[:, 2]) * spatial_scale
        if not aligned:
            rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
        sr_w = torch.ceil(rw / out_w).long()
        sr_h = torch.ceil(rh / out_h).long()
    key = (batch_idx * 1_000_003 + sr_h) * 1_000_003 + sr_w
    for value in torch.unique(key).tolist():
        sel = torch.nonzero(key == value).squeeze(1)
        i = int(sel[0])
        b, gh, gw = int(batch_idx[i]), int(sr_h[i]), int(sr_w[i])
        if gh <= 0 or gw <= 0:  # empty RoI under adaptive sampling: torchvision returns 0
            continue
        pooled = _align_group(input[b], rois[sel], out_h, out_w, gh, gw, spatial_scale, aligned)
        out.index_copy_(0, sel, pooled)
    return out


class RoIAlign(torch.nn.Module):
    """Module form of :func:`roi_align` (no parameters)."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int = 0,
                 aligned: bool = True):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale,
                         self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")
