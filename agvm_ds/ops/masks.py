"""Instance-mask helpers: training targets from full-image masks and pasting predictions back.

Mask R-CNN predicts each mask on a small ``M x M`` grid inside its box. Training targets are
the ground-truth masks resampled onto that grid with RoIAlign (``aligned=True`` so a box maps
onto the pixels it covers); predictions go back to the image by sampling the ``M x M`` grid
at every image pixel centre inside the box (one ``grid_sample`` per chunk of masks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from agvm_ds.ops.roi_align import roi_align

__all__ = ["mask_targets", "paste_masks"]


def mask_targets(gt_masks: Tensor, gt_index: Tensor, boxes: Tensor, size: int) -> Tensor:
    """``[k, size, size]`` binary float targets: ``gt_masks[gt_index[i]]`` inside ``boxes[i]``.

    ``gt_masks`` is ``[G, H, W]`` (any dtype) for one image. The RoIAligned coverage is
    thresholded at 0.5 (as detectron2 does): soft edge targets would put a floor under the
    binary cross-entropy and blur the predicted boundaries.
    """
    if boxes.shape[0] == 0:
        return gt_masks.new_zeros((0, size, size), dtype=torch.float32)
    rois = torch.cat([gt_index[:, None].to(boxes.dtype), boxes], dim=1)
    out = roi_align(gt_masks[:, None].float(), rois.float(), size, 1.0, 0, aligned=True)
    return (out[:, 0] >= 0.5).float()


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int,
                chunk_pixels: int = 1 << 24) -> Tensor:
    """Paste ``masks [k, M, M]`` (probabilities or logits) into ``[k, height, width]``.

    Pixel ``(y, x)`` of detection ``i`` samples the mask grid at the pixel centre's relative
    position inside ``boxes[i]``; outside the box the result is 0. Chunks keep memory below
    ``chunk_pixels`` samples whatever the image size.
    """
    k = masks.shape[0]
    out = masks.new_zeros((k, height, width))
    if k == 0 or height == 0 or width == 0:
        return out
    per_chunk = max(1, chunk_pixels // (height * width))
    ys = torch.arange(height, device=masks.device, dtype=masks.dtype) + 0.5
    xs = torch.arange(width, device=masks.device, dtype=masks.dtype) + 0.5
    for start in range(0, k, per_chunk):
        b = boxes[start:start + per_chunk].to(masks.dtype)
        m = masks[start:start + per_chunk]
        n = b.shape[0]
        bw = (b[:, 2] - b[:, 0]).clamp(min=1e-6)
        bh = (b[:, 3] - b[:, 1]).clamp(min=1e-6)
        gx = (xs[None] - b[:, 0:1]) / bw[:, None] * 2 - 1  # [n, W]
        gy = (ys[None] - b[:, 1:2]) / bh[:, None] * 2 - 1  # [n, H]
        grid = torch.stack([gx[:, None, :].expand(n, height, width),
                            gy[:, :, None].expand(n, height, width)], dim=-1)
        pasted = F.grid_sample(m[:, None], grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)[:, 0]
        inside = ((gx.abs() <= 1)[:, None, :] & (gy.abs() <= 1)[:, :, None])
        out[start:start + n] = pasted * inside
    return out
