"""Shared detector plumbing: backbone + neck, the train/predict contract, coordinate mapping.

Contract (docs/interfaces.md): ``model(images, targets)`` returns a dict of scalar losses;
``model.predict(images, targets)`` returns one dict per image in *original* image
coordinates. Targets carry ``image_size`` (resized, before padding), ``scale_factor``
(resized / original), ``orig_size`` and ``flipped``; predictions are clipped to the
resized image, un-flipped, and divided by the scale factor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from agvm_ds.models.backbones import build_backbone
from agvm_ds.models.necks import build_neck
from agvm_ds.ops import clip_boxes

__all__ = ["DenseModel", "image_sizes", "to_original_boxes", "original_size", "check_training_call"]


def image_sizes(images: Tensor, targets: list[dict] | None) -> list[tuple[int, int]]:
    """Valid (h, w) of each padded image: ``target["image_size"]`` or the padded size."""
    hp, wp = images.shape[-2:]
    if targets is None:
        return [(hp, wp)] * images.shape[0]
    return [tuple(int(v) for v in t.get("image_size", (hp, wp))) for t in targets]


def original_size(target: dict | None, resized: tuple[int, int]) -> tuple[int, int]:
    if target is None or "orig_size" not in target:
        return resized
    return tuple(int(v) for v in target["orig_size"])


def _scale_xy(target: dict | None) -> tuple[float, float]:
    s = 1.0 if target is None else target.get("scale_factor", 1.0)
    if isinstance(s, Tensor):
        s = s.tolist()
    if isinstance(s, (list, tuple)):
        return float(s[0]), float(s[1] if len(s) > 1 else s[0])
    return float(s), float(s)


def to_original_boxes(boxes: Tensor, target: dict | None, resized: tuple[int, int]) -> Tensor:
    """Resized-image xyxy boxes -> original-image xyxy (clipped, un-flipped, rescaled)."""
    boxes = clip_boxes(boxes, resized)
    if target is not None and bool(target.get("flipped", False)):
        w = resized[1]
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    sx, sy = _scale_xy(target)
    boxes = boxes / boxes.new_tensor([sx, sy, sx, sy])
    return clip_boxes(boxes, original_size(target, resized))


def check_training_call(model: nn.Module, images: Tensor, targets: list[dict] | None) -> None:
    """The training half of the contract: ``model(images, targets)`` needs one target per image
    (every detector that follows the contract checks its call here, so the message is one)."""
    if targets is None:
        raise ValueError(f"{type(model).__name__}.forward computes training losses and needs "
                         "targets; use .predict(images, targets) for inference")
    if len(targets) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(targets)} targets")


class DenseModel(nn.Module):
    """Backbone + FPN neck; subclasses add the heads and implement ``losses``/``inference``."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.num_classes = spec.num_classes
        self.backbone = build_backbone(spec.backbone)
        self.neck = build_neck(spec.neck, self.backbone)
        self.agvm_modules: dict[str, list[str]] = spec.module_partition()
        self.agvm_anchor: str = spec.anchor

    def extract(self, images: Tensor) -> list[Tensor]:
        return self.neck(self.backbone(images))

    def forward(self, images: Tensor, targets: list[dict] | None = None) -> dict[str, Tensor]:
        check_training_call(self, images, targets)
        targets = [{k: (v.to(images.device) if isinstance(v, Tensor) else v) for k, v in t.items()}
                   for t in targets]
        return self.losses(self.extract(images), images, targets)

    @torch.no_grad()
    def predict(self, images: Tensor, targets: list[dict] | None = None) -> list[dict]:
        was_training = self.training
        self.eval()
        try:
            return self.inference(self.extract(images), images, targets)
        finally:
            self.train(was_training)

    def losses(self, feats, images, targets) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inference(self, feats, images, targets) -> list[dict]:  # pragma: no cover
        raise NotImplementedError
