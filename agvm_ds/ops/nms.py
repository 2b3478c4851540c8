"""Greedy non-maximum suppression in plain torch, exact and vectorized.

Greedy NMS visits boxes by decreasing score and keeps a box unless a *kept* higher-scoring
box overlaps it by more than the threshold. Written as a recursion over the sorted order,
``keep[i] = not any(keep[j] and iou[j, i] > t for j < i)``, it has exactly one solution,
and the Jacobi iteration ``keep <- not ((keep @ S) > 0)`` (``S`` = strictly-upper-triangular
"j suppresses i" matrix), started from "keep everything", reaches it: after ``k`` rounds the
first ``k + 1`` entries are final, and once a round changes nothing the fixed point *is*
the greedy answer. In practice suppression chains are short, so a handful of mat-vecs
replace a Python loop over every box.

Boxes are processed in blocks of :data:`BLOCK` sorted boxes so memory stays
``O(BLOCK^2 + kept * BLOCK)`` however many candidates there are: a block is first
suppressed by everything kept in earlier blocks, then resolved internally as above.

Where torchvision's compiled ``nms`` kernel runs (:mod:`agvm_ds.ops._dispatch`) it does the
pairwise work instead, with the semantics kept exactly those of the greedy code here:

* order: torchvision's CUDA kernel sorts scores with an *unstable* sort, so equal scores
  could come out in any order. We sort (stably) ourselves and hand it the boxes in that
  order with strictly decreasing stand-in scores, so its order is ours;
* fp16 / bf16 boxes are compared in fp32 (the kernel has no bf16 and would do fp16 in fp16);
* :func:`batched_nms` runs one kernel call per category instead of torchvision's offset
  trick, whose shifted coordinates lose fp32 precision on large images.

What can still differ is the last bit of an IoU (the CUDA compiler may fuse a multiply-add)
for a pair whose IoU is within one ulp of the threshold.
"""

from __future__ import annotations

import torch
from torch import Tensor

from agvm_ds.ops import _dispatch
from agvm_ds.ops.boxes import box_iou

__all__ = ["nms", "batched_nms"]

BLOCK = 2048
SPLIT_ABOVE = 1024  # batched_nms: per-category passes above this many boxes
def _resolve_block(iou: Tensor, threshold: float) -> Tensor:
    """Greedy keep-mask of one block of score-sorted boxes from its own ``[n, n]`` IoU."""
    n = iou.shape[0]
    sup = torch.triu(iou > threshold, diagonal=1).to(iou.dtype)  # sup[j, i]: j may kill i
    keep = torch.ones(n, dtype=iou.dtype, device=iou.device)
    for _ in range(n + 1):
        new = ((keep @ sup) == 0).to(iou.dtype)
        if torch.equal(new, keep):
            break
        keep = new
    return keep.bool()


def _pairwise(a: Tensor, b: Tensor, ca: Tensor | None, cb: Tensor | None) -> Tensor:
    """IoU of every pair; pairs of different categories get IoU 0 so never suppress."""
    iou = box_iou(a, b)
    if ca is not None:
        iou = iou * (ca[:, None] == cb[None, :])
    return iou


def _greedy(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None) -> Tensor:
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    boxes = boxes.detach()
    if boxes.dtype in (torch.float16, torch.bfloat16):
        boxes = boxes.float()
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    sorted_boxes = boxes[order]
    sorted_cls = idxs[order] if idxs is not None else None
    kept: list[Tensor] = []  # positions (into ``order``) kept so far
    for start in range(0, len(order), BLOCK):
        stop = min(start + BLOCK, len(order))
        block = sorted_boxes[start:stop]
        bcls = sorted_cls[start:stop] if sorted_cls is not None else None
        alive = torch.ones(stop - start, dtype=torch.bool, device=boxes.device)
        if kept:
            prev = torch.cat(kept)
            pcls = sorted_cls[prev] if sorted_cls is not None else None
            alive = (_pairwise(sorted_boxes[prev], block, pcls, bcls) <= iou_threshold).all(dim=0)
        cand = torch.nonzero(alive).squeeze(1)
        if len(cand) == 0:
            continue
        ccls = bcls[cand] if bcls is not None else None
        keep = _resolve_block(_pairwise(block[cand], block[cand], ccls, ccls), iou_threshold)
        kept.append(cand[keep] + start)
    if not kept:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    return order[torch.cat(kept)]


def _compiled(op, boxes: Tensor, scores: Tensor, iou_threshold: float,
              idxs: Tensor | None) -> Tensor:
    """Greedy NMS with torchvision's kernel doing the IoU work (semantics: module docstring)."""
    n = boxes.shape[0]
    boxes = boxes.detach()
    if boxes.dtype in (torch.float16, torch.bfloat16):
        boxes = boxes.float()
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    b = boxes[order]

    def ranked(sub: Tensor) -> Tensor:  # kept positions of ``sub`` (already in greedy order)
        stand_in = torch.arange(sub.shape[0], 0, -1, dtype=sub.dtype, device=sub.device)
        return op(sub, stand_in, float(iou_threshold))

    if idxs is None:
        return order[ranked(b)]
    cls = idxs[order]
    kept = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    for c in torch.unique(cls):
        pos = torch.nonzero(cls == c).squeeze(1)
        kept[pos[ranked(b[pos])]] = True
    return order[torch.nonzero(kept).squeeze(1)]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices (int64, by decreasing score) of the boxes greedy NMS keeps.

    A box is suppressed when its IoU with a kept, higher-scoring box is strictly greater than
    ``iou_threshold`` (torchvision's convention). Equal scores keep the lower index first.
    """
    op = _dispatch.compiled_op("nms", boxes.device)
    if op is not None and boxes.numel():
        return _compiled(op, boxes, scores, iou_threshold, None)
    return _greedy(boxes, scores, iou_threshold, None)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS run independently per category ``idxs``; returns indices by decreasing score.

    Small inputs run as one masked NMS (IoUs across categories are zeroed - no coordinate
    offset trick, so no precision is lost on large images). Large inputs run one NMS per
    category and merge, which skips the cross-category part of the IoU matrix entirely.
    """
    op = _dispatch.compiled_op("nms", boxes.device)
    if op is not None and boxes.numel():
        return _compiled(op, boxes, scores, iou_threshold, idxs)
    if boxes.shape[0] <= SPLIT_ABOVE:
        return _greedy(boxes, scores, iou_threshold, idxs)
    kept = []
    for c in torch.unique(idxs):
        members = torch.nonzero(idxs == c).squeeze(1)
        kept.append(members[_greedy(boxes[members], scores[members], iou_threshold, None)])
    kept_idx = torch.cat(kept)
    # final order: decreasing score, lower index first on ties (what one greedy pass gives)
    kept_idx = kept_idx.sort().values
    order = torch.sort(scores[kept_idx], descending=True, stable=True).indices
    return kept_idx[order]
