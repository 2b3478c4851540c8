"""Detection ops in plain torch (no compiled extensions needed).

torchvision's compiled kernels (``nms``, ``roi_align``) do not load with CPU-only torch, and a
library that must run everywhere cannot depend on them, so every detector here uses these.
Where those kernels do load (CUDA torch with a matching torchvision), :func:`nms`,
:func:`batched_nms` and :func:`roi_align` hand the work to them, with the same semantics
(see :mod:`agvm_ds.ops._dispatch` for how that is decided, once per op and device type).
"""

from agvm_ds.ops.anchors import AnchorGenerator, cell_anchors
from agvm_ds.ops.box_coder import BoxCoder
from agvm_ds.ops.boxes import (box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                               box_xyxy_to_xywh, clip_boxes, generalized_box_iou, nonempty_boxes,
                               pairwise_giou, scale_boxes)
from agvm_ds.ops.losses import giou_loss, sigmoid_focal_loss, smooth_l1_loss
from agvm_ds.ops.masks import mask_targets, paste_masks
from agvm_ds.ops.matcher import Matcher, sample_balanced
from agvm_ds.ops.nms import batched_nms, nms
from agvm_ds.ops.roi_align import RoIAlign, boxes_to_rois, roi_align

__all__ = [
    "AnchorGenerator", "BoxCoder", "Matcher", "RoIAlign", "batched_nms", "box_area",
    "box_cxcywh_to_xyxy", "box_iou", "box_xyxy_to_cxcywh", "box_xyxy_to_xywh", "boxes_to_rois",
    "cell_anchors", "clip_boxes", "generalized_box_iou", "giou_loss", "mask_targets", "nms",
    "nonempty_boxes", "pairwise_giou", "paste_masks", "roi_align", "sample_balanced",
    "scale_boxes", "sigmoid_focal_loss", "smooth_l1_loss",
]
