"""Assign ground truth to anchors/proposals by IoU and sample balanced training subsets."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Matcher", "sample_balanced"]


class Matcher:
    """IoU matcher: ``IoU >= high`` -> foreground (1), ``< low`` -> background (0), between
    -> ignored (-1).

    ``allow_low_quality`` additionally makes every ground-truth box claim the predictions
    it overlaps best (ties included), even below ``high``, so no object goes untrained
    because its shape fits no anchor well (Faster R-CNN's RPN rule).
    """

    def __init__(self, high: float, low: float, allow_low_quality: bool = False):
        if low > high:
            raise ValueError(f"Matcher: low threshold {low} is above high threshold {high}")
        self.high, self.low = float(high), float(low)
        self.allow_low_quality = allow_low_quality

    def __call__(self, iou: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``iou [..., G, P]`` -> (matched gt index ``[..., P]``, label ``[..., P]`` in {1, 0, -1}).

        Leading dims are independent problems (a batch of images, ground truth padded to
        the largest count); ``valid [..., G]`` marks the real rows, padding never matches.
        An image without valid ground truth gets index 0 and label 0 (all background).
        """
        lead, num_gt, num_pred = iou.shape[:-2], iou.shape[-2], iou.shape[-1]
        if num_gt == 0:
            return (torch.zeros(*lead, num_pred, dtype=torch.int64, device=iou.device),
                    torch.zeros(*lead, num_pred, dtype=torch.int8, device=iou.device))
        if valid is not None:
            # -1 is below any IoU, so a padded row neither wins a prediction nor (being <= 0)
            # claims one as a low-quality match
            iou = iou.masked_fill(~valid.unsqueeze(-1), -1.0)
        best, idx = iou.max(dim=-2)
        # 1 at or above high, -1 in [low, high), 0 below low (NaN stays 1, as comparisons fail)
        labels = torch.ones(best.shape, dtype=torch.int8, device=iou.device)
        labels = torch.where(best < self.low, 0, torch.where(best < self.high, -1, labels))
        if self.allow_low_quality:
            per_gt = iou.max(dim=-1, keepdim=True).values
            claim = ((iou == per_gt) & (per_gt > 0)).any(dim=-2)
            labels = torch.where(claim, 1, labels)
        return idx, labels


def sample_balanced(labels: Tensor, num: int, positive_fraction: float,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random positive / negative subsets of ``labels`` (1 / 0; -1 ignored).

    At most ``num * positive_fraction`` positives; negatives fill the rest of ``num``.
    Returns index tensors ``(pos, neg)``.
    """
    pos = torch.nonzero(labels == 1).squeeze(1)
    neg = torch.nonzero(labels == 0).squeeze(1)
    n_pos = min(len(pos), int(num * positive_fraction))
    n_neg = min(len(neg), num - n_pos)
    pos = pos[torch.randperm(len(pos), device=pos.device, generator=generator)[:n_pos]]
    neg = neg[torch.randperm(len(neg), device=neg.device, generator=generator)[:n_neg]]
    return pos, neg
