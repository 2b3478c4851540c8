"""Detection losses: sigmoid focal loss, smooth-L1, GIoU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from agvm_ds.ops.boxes import pairwise_giou

__all__ = ["sigmoid_focal_loss", "focal_loss_from_labels", "smooth_l1_loss", "giou_loss"]


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


def _focal_terms(x: Tensor, weight: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Per-element focal loss and its gradient for background (all-zero) targets.

    With target 0 the focal loss of logit ``x`` is ``w * q^g * softplus(x)``, ``q =
    sigmoid(x)``, whose derivative is ``w * q^g * (g * (1 - q) * softplus(x) + q)``
    ``= g * L + q * (w * q^g - g * L)``. A target-1 element is the same expression at ``-x``
    with the gradient's sign flipped. Formed with three full-size buffers and in-place
    updates: fresh large tensors are what costs most on CPU (each one page-faults in).
    """
    q = torch.sigmoid(x)
    loss = F.softplus(x)
    qg = q * q if gamma == 2 else q.pow(gamma)
    qg.mul_(weight)
    loss.mul_(qg)
    grad = qg.sub_(loss, alpha=gamma).mul_(q).add_(loss, alpha=gamma)
    return loss, grad


class _FocalFromLabels(torch.autograd.Function):
    """Focal loss of ``[..., K]`` logits against integer labels, gradient formed in the forward.

    Every element is first treated as background; the few target-1 elements (one per
    foreground anchor) are then recomputed exactly at their ``(anchor, class)`` positions.
    Against autograd's graph of the textbook formula on a one-hot tensor gathered to the
    valid anchors, this drops the one-hot, the gather and its scatter back, and most of
    the ~40 elementwise passes over the (anchors x classes) tensor - on CPU the largest
    block of the head's time outside its convolutions.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
        k = logits.shape[-1]
        # formed in fp32 at least, whatever the network runs in (fp64 stays fp64)
        x = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
        valid = (labels >= 0).unsqueeze(-1).to(x.dtype)
        loss, grad = _focal_terms(x, valid * (1.0 - alpha) if alpha >= 0 else valid, gamma)
        pos = ((labels >= 0) & (labels < k)).nonzero(as_tuple=True)
        at = pos + (labels[pos],)
        w_pos = torch.full((len(at[0]),), alpha if alpha >= 0 else 1.0, dtype=x.dtype, device=x.device)
        loss_pos, grad_pos = _focal_terms(-x[at], w_pos, gamma)
        loss.index_put_(at, loss_pos)
        grad.index_put_(at, grad_pos.neg_())
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(grad.to(logits.dtype))
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None


def focal_loss_from_labels(logits: Tensor, labels: Tensor, alpha: float = 0.25,
                           gamma: float = 2.0) -> Tensor:
    """Summed sigmoid focal loss of ``logits [..., K]`` against ``labels [...]``: a label in
    ``[0, K)`` is that class's one-hot target, ``K`` or above is background (all zeros),
    a negative label is ignored (contributes neither loss nor gradient).

    The same value as ``sigmoid_focal_loss(logits[labels >= 0], one_hot)`` without
    gathering the valid rows or building the one-hot tensor, and with a hand-written
    gradient (see ``_FocalFromLabels``)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"focal_loss_from_labels: logits {tuple(logits.shape)} do not match "
                         f"labels {tuple(labels.shape)} (expected labels of shape logits[..., 0])")
    return _FocalFromLabels.apply(logits, labels, float(alpha), float(gamma))


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """Summed smooth-L1 (plain L1 when ``beta == 0``)."""
    diff = (pred - target).abs()
    if beta <= 0:
        return diff.sum()
    return torch.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta).sum()


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """Summed ``1 - GIoU`` of matched xyxy boxes."""
    return (1 - pairwise_giou(pred_boxes, target_boxes)).sum()
