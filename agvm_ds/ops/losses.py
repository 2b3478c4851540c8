"""Detection losses: sigmoid focal loss, smooth-L1, GIoU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from agvm_ds.ops.boxes import pairwise_giou

__all__ = ["sigmoid_focal_loss", "smooth_l1_loss", "giou_loss"]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Summed focal loss (Lin et al. 2017) of one-vs-all sigmoid logits.

    ``(1 - p_t)^gamma`` down-weights the flood of easy background anchors so the few
    foreground ones dominate the gradient; ``alpha`` balances the two classes.
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.sum()


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """Summed smooth-L1 (plain L1 when ``beta == 0``)."""
    diff = (pred - target).abs()
    if beta <= 0:
        return diff.sum()
    return torch.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta).sum()


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """Summed ``1 - GIoU`` of matched xyxy boxes."""
    return (1 - pairwise_giou(pred_boxes, target_boxes)).sum()
