"""A torchvision detection model behind the package contract (``detectors/base.py``).

:class:`TorchvisionDetector` wraps FCOS, RetinaNet and Faster / Mask R-CNN as torchvision
builds them, so the launcher trains, evaluates, exports and predicts them like its own:

* **One data pipeline.** torchvision's models resize and normalize inside
  (``GeneralizedRCNNTransform``); the package's data pipeline already did both, so the
  wrapped model's transform is replaced by :class:`PassThroughTransform`, which only
  batches (normalize and resize are the identity). The padded batch is cut back into its
  images (``target["image_size"]``) so torchvision sees each image's valid size.
* **Labels.** The package's datasets emit contiguous labels ``0..K-1``. torchvision's
  R-CNNs reserve label 0 for background (``num_classes = K + 1``); FCOS and RetinaNet do
  not. The wrapper adds and removes that offset.
* **Coordinates.** Training boxes are in resized-image coordinates (what the pipeline
  emits); ``predict`` maps boxes (and Mask R-CNN's masks) back to the original image with
  :func:`~agvm_ds.models.detectors.base.to_original_boxes` (clip, un-flip, un-scale).
* **Partition.** :func:`agvm_ds.partition.infer_partition` on the wrapped model, each
  prefix under the wrapper's attribute ``detector.``, declared as ``agvm_modules``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agvm_ds.errors import ConfigError
from agvm_ds.models.detectors.base import image_sizes, original_size, to_original_boxes
from agvm_ds.partition import infer_partition

__all__ = ["TorchvisionDetector", "PassThroughTransform", "build_torchvision", "is_torchvision_detector",
           "reserves_background"]

ATTR = "detector"  # the wrapper's attribute holding the torchvision model: partition prefixes start here


def _transform_class():
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class PassThroughTransform(GeneralizedRCNNTransform):
        """torchvision's transform with normalize and resize the identity: it only batches
        (padding to ``size_divisible``) and maps predictions back from the batch's image
        sizes — which are the images' own, so that is the identity too."""

        def normalize(self, image: Tensor) -> Tensor:
            return image

        def resize(self, image, target=None):
            return image, target

    return PassThroughTransform


def PassThroughTransform(size_divisible: int = 32):  # noqa: N802 - builds the class above lazily
    return _transform_class()(min_size=1, max_size=1, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
                              size_divisible=size_divisible)


def is_torchvision_detector(model: nn.Module) -> bool:
    """A torchvision detector whose ``forward(images, targets)`` has torchvision's contract."""
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    return isinstance(model, (GeneralizedRCNN, FCOS, RetinaNet))


def reserves_background(model: nn.Module) -> bool:
    """torchvision's R-CNNs keep label 0 for background; FCOS / RetinaNet do not."""
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    return isinstance(model, GeneralizedRCNN)


def _class_outputs(model: nn.Module) -> int | None:
    """How many classes the model scores (R-CNN: background included), where it says."""
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    if predictor is not None and hasattr(predictor, "cls_score"):
        return predictor.cls_score.out_features
    head = getattr(getattr(model, "head", None), "classification_head", None)
    return getattr(head, "num_classes", None)


class TorchvisionDetector(nn.Module):
    """``detector`` (a torchvision FCOS / RetinaNet / Faster / Mask R-CNN) with the package's
    ``forward(images, targets)`` → losses and ``predict(images, targets)`` → original-image
    detections. ``num_classes``: the dataset's classes (labels ``0..num_classes-1``)."""

    def __init__(self, detector: nn.Module, num_classes: int, mask_threshold: float = 0.5):
        super().__init__()
        if not is_torchvision_detector(detector):
            raise ConfigError(f"model.builder: {type(detector).__name__} is not a torchvision FCOS / RetinaNet / "
                              "R-CNN detector")
        self.offset = 1 if reserves_background(detector) else 0
        outputs = _class_outputs(detector)
        if outputs is not None and outputs != num_classes + self.offset:
            need = f"{num_classes} + 1 (torchvision's background)" if self.offset else str(num_classes)
            raise ConfigError(f"model.num_classes: the {type(detector).__name__} scores {outputs} classes, the "
                              f"dataset needs {need}")
        size_divisible = getattr(getattr(detector, "transform", None), "size_divisible", 32)
        detector.transform = PassThroughTransform(size_divisible)
        self.detector = detector
        self.num_classes = num_classes
        self.mask_threshold = mask_threshold
        inferred = infer_partition(detector)
        self.agvm_modules = OrderedDict((m, [f"{ATTR}.{p}" for p in ps]) for m, ps in inferred.modules.items())
        self.agvm_anchor = inferred.anchor
        self.agvm_layout = inferred.layout
        body = getattr(getattr(detector, "backbone", None), "body", None)
        self.backbone_key_prefix = f"{ATTR}.backbone.body." if body is not None else f"{ATTR}.backbone."

    @staticmethod
    def _crops(images: Tensor, targets: list[dict] | None) -> tuple[list[Tensor], list[tuple[int, int]]]:
        sizes = image_sizes(images, targets)
        return [images[i, :, :h, :w] for i, (h, w) in enumerate(sizes)], sizes

    def forward(self, images: Tensor, targets: list[dict] | None = None) -> dict[str, Tensor]:
        if targets is None:
            raise ValueError("TorchvisionDetector.forward computes training losses and needs targets; "
                             "use .predict(images, targets) for inference")
        if len(targets) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(targets)} targets")
        crops, _ = self._crops(images, targets)
        device = images.device
        wanted = ("boxes", "labels", "masks")
        converted = []
        for t in targets:
            d = {k: t[k].to(device) for k in wanted if k in t}
            d["labels"] = d["labels"] + self.offset
            converted.append(d)
        return self.detector(crops, converted)

    @torch.no_grad()
    def predict(self, images: Tensor, targets: list[dict] | None = None) -> list[dict]:
        was_training = self.training
        self.eval()
        try:
            crops, sizes = self._crops(images, targets)
            raw = self.detector(crops)
        finally:
            self.train(was_training)
        return [self._to_original(det, targets[i] if targets else None, sizes[i]) for i, det in enumerate(raw)]

    def _to_original(self, det: dict, target: dict | None, size: tuple[int, int]) -> dict:
        out = {"boxes": to_original_boxes(det["boxes"], target, size), "scores": det["scores"],
               "labels": det["labels"] - self.offset}
        if "masks" in det:  # [n, 1, h, w] probabilities over the resized image
            probs = det["masks"][:, 0]
            if target is not None and bool(target.get("flipped", False)):
                probs = probs.flip(-1)
            h0, w0 = original_size(target, size)
            if (h0, w0) != tuple(probs.shape[-2:]) and probs.shape[0]:
                probs = F.interpolate(probs[:, None], size=(h0, w0), mode="bilinear", align_corners=False)[:, 0]
            out["masks"] = probs.reshape(-1, h0, w0) > self.mask_threshold
        return out


def build_torchvision(constructor: str, num_classes: int, kwargs: dict) -> TorchvisionDetector:
    """``torchvision.models.detection.<constructor>(weights=None, weights_backbone=None,
    num_classes=..., **kwargs)`` wrapped (the background class added for R-CNNs)."""
    from torchvision.models import detection

    from agvm_ds.families import TORCHVISION_DETECTORS

    _, background = TORCHVISION_DETECTORS[constructor]
    build = getattr(detection, constructor)
    try:
        model = build(weights=None, weights_backbone=None, num_classes=num_classes + int(background), **kwargs)
    except TypeError as err:
        raise ConfigError(f"model.kwargs: {constructor}: {err}") from None
    return TorchvisionDetector(model, num_classes)
