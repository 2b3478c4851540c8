"""Box geometry in plain torch: areas, pairwise IoU / GIoU, conversions and clipping.

All boxes are ``xyxy`` in pixels (``x2``/``y2`` exclusive edges, so a box's width is simply
``x2 - x1``, as in COCO and torchvision). Everything here is a broadcasted tensor expression:
no Python loops, so it runs at the speed of the underlying kernels on CPU and GPU alike and
is differentiable where that makes sense (GIoU is used as a regression loss).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_area", "box_iou", "generalized_box_iou", "pairwise_giou", "clip_boxes",
           "nonempty_boxes", "box_xyxy_to_xywh", "box_xyxy_to_cxcywh", "box_cxcywh_to_xyxy",
           "scale_boxes"]


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``[..., 4]`` xyxy boxes; degenerate boxes (x2 < x1) count as zero area."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union of every pair: ``a [..., N, 4]`` x ``b [..., M, 4]`` -> two
    ``[..., N, M]`` (leading dims broadcast, so a padded batch of ground truth ``[B, G, 4]``
    meets shared anchors ``[M, 4]`` in one call instead of a loop over images).

    Computed per axis on ``[N, M]`` tensors (not on stacked ``[N, M, 2]`` corners): the
    same arithmetic with contiguous operands, which is markedly faster on CPU for the
    large matrices NMS builds.
    """
    ax1, ay1, ax2, ay2 = (c.unsqueeze(-1) for c in a.unbind(-1))
    bx1, by1, bx2, by2 = (c.unsqueeze(-2) for c in b.unbind(-1))
    iw = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp_(min=0)
    ih = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp_(min=0)
    inter = iw.mul_(ih)
    union = (box_area(a).unsqueeze(-1) + box_area(b).unsqueeze(-2)) - inter
    return inter, union


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU ``[..., N, M]`` of ``a [..., N, 4]`` and ``b [..., M, 4]`` (leading dims
    broadcast). A pair whose union is empty has IoU 0 (not NaN): the intersection never
    exceeds the union, so an empty union has an empty intersection and 0 / tiny = 0."""
    inter, union = _inter_union(a, b)
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise generalized IoU ``[N, M]`` (Rezatofighi et al. 2019), in ``[-1, 1]``.

    GIoU = IoU - (|C| - |A u B|) / |C| with C the smallest enclosing box; unlike IoU it
    still has a gradient when boxes do not overlap, which is why it is a useful loss.
    """
    inter, union = _inter_union(a, b)
    tiny = torch.finfo(union.dtype).tiny
    iou = torch.where(union > 0, inter / union.clamp(min=tiny), torch.zeros_like(inter))
    lt = torch.minimum(a[:, None, :2], b[None, :, :2])
    rb = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - torch.where(hull > 0, (hull - union) / hull.clamp(min=tiny), torch.zeros_like(hull))


def pairwise_giou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Element-wise GIoU of matched boxes ``a[i]`` vs ``b[i]`` (``[N, 4]`` each) -> ``[N]``."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(a) + box_area(b) - inter
    iou = inter / (union + eps)
    hull_wh = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return iou - (hull - union) / (hull + eps)


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip xyxy boxes to an image of ``size = (h, w)`` (returns a new tensor)."""
    h, w = size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def nonempty_boxes(boxes: Tensor, min_size: float = 0.0) -> Tensor:
    """Bool mask of boxes whose width and height both exceed ``min_size``."""
    wh = boxes[..., 2:] - boxes[..., :2]
    return (wh > min_size).all(dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    return torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], dim=-1)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    half = boxes[..., 2:] / 2
    return torch.cat([boxes[..., :2] - half, boxes[..., :2] + half], dim=-1)


def scale_boxes(boxes: Tensor, sx: float, sy: float) -> Tensor:
    """Multiply x coordinates by ``sx`` and y coordinates by ``sy``."""
    factor = boxes.new_tensor([sx, sy, sx, sy])
    return boxes * factor
