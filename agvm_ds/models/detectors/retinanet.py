"""RetinaNet = backbone + FPN + dense focal-loss head. AGVM modules: backbone, neck, head."""

from __future__ import annotations

from agvm_ds.models.detectors.base import DenseModel, image_sizes, to_original_boxes
from agvm_ds.models.heads.retina import RetinaHead

__all__ = ["RetinaNet"]

class RetinaNet(DenseModel):
    def __init__(self, spec):
        super().__init__(spec)
        self.head = RetinaHead(spec.head, spec.neck.out_channels, self.neck.strides, spec.num_classes)

    def losses(self, feats, images, targets):
        return self.head.losses(feats, targets)

    def inference(self, feats, images, targets):
        sizes = image_sizes(images, targets)
        out = []
        for i, det in enumerate(self.head.inference(feats, sizes)):
            t = targets[i] if targets is not None else None
            det["boxes"] = to_original_boxes(det["boxes"], t, sizes[i])
            out.append(det)
        return out
