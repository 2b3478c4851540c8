"""Hugging Face DETR-family detectors (DETR, Deformable DETR, RT-DETR) behind agvm-ds's detector contract.

:func:`build_hf_detector` builds ``transformers``' ``*ForObjectDetection`` from a config dict,
with random weights and nothing downloaded, as a subclass of HF's class with
:class:`HFDetectorContract` mixed in (so its modules and state-dict keys stay HF's own), which
speaks the contract of docs/interfaces.md (``model(images, targets)`` → scalar losses,
``model.predict(images, targets)`` → detections in original-image pixels).

Conventions, each checked in tests/test_hf_detr.py:

* Labels: our datasets emit contiguous ``0..C-1``; HF's ``class_labels`` are ``0..num_labels-1``
  with its "no object" class internal (DETR's extra last logit), so they pass unchanged.
* Boxes: HF regresses normalized ``(cx, cy, w, h)``. DETR and Deformable DETR see the padding
  (``pixel_mask`` drives their position encodings and Deformable DETR's valid ratios), so
  their boxes are relative to each image's valid (unpadded) size, as the models' own docs
  say. RT-DETR never reads the mask: its anchors tile the whole padded input, so its boxes
  are relative to the padded size (``FAMILIES[...].frame``).
* Losses: HF's own Hungarian-matched criterion; the returned components are the ones HF sums
  into ``outputs.loss``, each already multiplied by HF's weight (DETR and Deformable DETR
  return them unweighted, RT-DETR weighted; ``cardinality_error`` is a log, not a loss).
* Scores: DETR: softmax without the no-object class, best class per query; Deformable DETR /
  RT-DETR: sigmoid, top-k over (query, class) pairs — what each family's
  ``post_process_object_detection`` does, with ``score_thresh`` / ``max_detections``.

HF's matcher solves the assignment on the CPU (a host sync per step that a Hungarian match
cannot avoid) with ``scipy.optimize.linear_sum_assignment``; where scipy is not installed,
:func:`install_assignment` hands its loss modules :func:`agvm_ds.ops.assignment.linear_sum_assignment`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Any

import torch
from torch import Tensor, nn

from agvm_ds.errors import ConfigError
from agvm_ds.models.detectors.base import check_training_call, image_sizes, to_original_boxes
from agvm_ds.ops.assignment import linear_sum_assignment
from agvm_ds.ops.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = ["FAMILIES", "HFDetectorContract", "build_hf_detector", "contract_class", "install_assignment",
           "build_detr", "build_deformable_detr", "build_rt_detr", "check_detr", "check_deformable_detr",
           "check_rt_detr"]


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF model type: its config and model classes and how its outputs are read."""

    config_class: str
    model_class: str
    sigmoid: bool  # focal-style class head (no "no object" logit)
    frame: str  # what pred_boxes are normalized by: "valid" (unpadded) or "padded" size
    weighted: bool  # loss_dict already multiplied by the loss weights


FAMILIES: dict[str, Family] = {
    "detr": Family("DetrConfig", "DetrForObjectDetection", sigmoid=False, frame="valid", weighted=False),
    "deformable_detr": Family("DeformableDetrConfig", "DeformableDetrForObjectDetection",
                              sigmoid=True, frame="valid", weighted=False),
    "rt_detr": Family("RTDetrConfig", "RTDetrForObjectDetection", sigmoid=True, frame="padded", weighted=True),
}

# config keys whose string value names something to fetch; a bare timm architecture name
# ("resnet50") is built locally, a repo id ("org/name") or "hf-hub:..." is not
_NAME_KEYS = ("backbone", "_name_or_path", "name_or_path", "pretrained_model_name_or_path")
_LOSS_MODULES = ("loss_for_object_detection", "loss_deformable_detr", "loss_rt_detr")


def _say(where: str, key: str, text: str) -> str:
    """``where.key: text`` (``where`` empty: the key alone; both empty: the text alone)."""
    path = ".".join(p for p in (where, key) if p)
    return f"{path}: {text}" if path else text


def _refuse_downloads(config: Any, where: str) -> None:
    """One ConfigError naming the first key that would fetch weights or a config."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, (list, tuple)) else ()
    for key, value in items:
        path = ".".join(p for p in (where, str(key)) if p)
        if key == "use_pretrained_backbone" and value:
            raise ConfigError(_say(path, "", "pretrained backbones are not downloaded here; set it to false "
                                             "(and load local weights into the built model)"))
        if key in _NAME_KEYS and isinstance(value, str) and ("/" in value or ":" in value):
            raise ConfigError(_say(path, "", f"{value!r} names a Hub repository or file, which would be "
                                             "downloaded; describe the backbone with backbone_config instead"))
        _refuse_downloads(value, path)


def _check_config(model_type: str, config: Any, num_classes: int, where: str) -> dict:
    if model_type not in FAMILIES:
        raise ConfigError(_say(where, "", f"unknown Hugging Face detector {model_type!r}; one of {sorted(FAMILIES)}"))
    if not isinstance(config, dict):
        raise ConfigError(_say(where, "", f"the {model_type} config must be a mapping, got {type(config).__name__}"))
    _refuse_downloads(config, where)
    if isinstance(config.get("backbone"), str) and config.get("use_timm_backbone") is False:
        # transformers then asks the Hub whether the name is a repository (a network call)
        raise ConfigError(_say(where, "backbone", f"with use_timm_backbone false, transformers looks "
                               f"{config['backbone']!r} up on the Hub; describe it with backbone_config instead"))
    labels = config.get("num_labels", num_classes)
    if labels != num_classes:
        raise ConfigError(_say(where, "num_labels", f"{labels} but the dataset has {num_classes} classes"))
    if model_type == "rt_detr" and config.get("use_focal_loss", True) is False:
        raise ConfigError(_say(where, "use_focal_loss", "false is not supported for rt_detr "
                               "(its class head has no no-object logit to drop)"))
    return {**config, "num_labels": num_classes}


def install_assignment() -> bool:
    """Point transformers' DETR-family losses at our assignment solver where scipy is missing.

    Their matchers call ``requires_backends(self, ["scipy"])`` and the module-level
    ``linear_sum_assignment`` that only exists when scipy imported; both are looked up in the
    loss modules' globals, so those are what this sets. Returns whether it acted."""
    if importlib.util.find_spec("scipy") is not None:
        return False
    for name in _LOSS_MODULES:
        try:
            mod = importlib.import_module(f"transformers.loss.{name}")
        except ImportError:
            continue
        mod.linear_sum_assignment = linear_sum_assignment
        check = getattr(mod, "requires_backends", None)
        if check is not None and not getattr(check, "_agvm_without_scipy", False):
            mod.requires_backends = _without_scipy(check)
    return True


def _without_scipy(check):
    def requires_backends(obj, backends):
        rest = [b for b in ([backends] if isinstance(backends, str) else backends) if b != "scipy"]
        if rest:
            check(obj, rest)

    requires_backends._agvm_without_scipy = True
    return requires_backends


def build_hf_detector(model_type: str, config: dict, num_classes: int, *, score_thresh: float = 0.05,
                      max_detections: int = 100, where: str = "model.kwargs") -> "HFDetectorContract":
    """A ``transformers`` DETR-family detector from its config dict, randomly initialized.

    ``model_type``: ``"detr"``, ``"deformable_detr"`` or ``"rt_detr"``; ``config``: the keyword
    arguments of its ``*Config`` (``num_labels`` may be left out: it is ``num_classes``).
    Refused in one line before anything is built: an unknown type, ``use_pretrained_backbone``,
    a Hub name, a ``num_labels`` other than ``num_classes``. ``where`` prefixes the key names.
    The result *is* the HF model (its class a subclass of HF's with the contract mixed in), so
    its modules and state-dict keys are HF's own: ``model.backbone``, ``class_labels_classifier``."""
    if not 0.0 <= score_thresh <= 1.0:
        raise ConfigError(f"score_thresh: {score_thresh} is not in [0, 1]")
    if max_detections < 1:
        raise ConfigError(f"max_detections: {max_detections} must be at least 1")
    kwargs = _check_config(model_type, config, num_classes, where)
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(_say(where, "", f"Hugging Face detectors need transformers "
                               f"(pip install 'agvm-ds[hf]'): {exc}")) from None
    family = FAMILIES[model_type]
    try:
        hf_config = getattr(transformers, family.config_class)(**kwargs)
    except Exception as exc:  # strict-dataclass validation errors are no ValueError subclass
        raise ConfigError(_say(where, "", f"transformers refused the {model_type} config: "
                               f"{type(exc).__name__}: {' '.join(str(exc).split())}")) from None
    install_assignment()
    model = contract_class(model_type)(hf_config)
    model.hf_family = family
    model.num_classes = num_classes
    model.score_thresh = float(score_thresh)
    model.max_detections = int(max_detections)
    model.build_kwargs = {"model_type": model_type, "config": dict(config)}
    return model


# -- the launcher's family rows (agvm_ds.families): target(num_classes=N, **model.kwargs) --------

def build_detr(num_classes: int, **config) -> "HFDetectorContract":
    return build_hf_detector("detr", config, num_classes)


def build_deformable_detr(num_classes: int, **config) -> "HFDetectorContract":
    return build_hf_detector("deformable_detr", config, num_classes)


def build_rt_detr(num_classes: int, **config) -> "HFDetectorContract":
    return build_hf_detector("rt_detr", config, num_classes)


def _check_row(model_type: str, config: dict) -> None:
    """The rows' cheap config check (no transformers import); keys relative to model.kwargs."""
    _check_config(model_type, config, config.get("num_labels", 1), where="")


def check_detr(config: dict) -> None:
    _check_row("detr", config)


def check_deformable_detr(config: dict) -> None:
    _check_row("deformable_detr", config)


def check_rt_detr(config: dict) -> None:
    _check_row("rt_detr", config)


# -- the contract, mixed into HF's own class -----------------------------------------------------

_CLASSES: dict[str, type] = {}


def contract_class(model_type: str) -> type:
    """``HFDetectorContract`` + the family's ``*ForObjectDetection``, made once per family and
    bound in this module as ``Agvm<HF class name>`` (pickle looks classes up by name)."""
    if model_type not in _CLASSES:
        import transformers

        base = getattr(transformers, FAMILIES[model_type].model_class)
        cls = type(f"Agvm{base.__name__}", (HFDetectorContract, base), {"__module__": __name__})
        _CLASSES[model_type] = globals()[cls.__name__] = cls
    return _CLASSES[model_type]


def __getattr__(name: str) -> type:
    """``Agvm<HF class>`` made on first lookup, so an unpickling process finds it by name."""
    for model_type, family in FAMILIES.items():
        if name == f"Agvm{family.model_class}":
            return contract_class(model_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class HFDetectorContract(nn.Module):
    """The detector contract over a ``transformers`` ``*ForObjectDetection`` (mixed in first,
    so ``forward`` is ours and ``super().forward`` is HF's). Set by :func:`build_hf_detector`:
    ``hf_family`` (its :class:`Family`), ``num_classes``, ``score_thresh``, ``max_detections``
    and ``build_kwargs`` (what it was built from, to record a builder and rebuild it)."""

    hf_family: Family
    num_classes: int
    score_thresh: float
    max_detections: int
    build_kwargs: dict

    # ---- inputs ---------------------------------------------------------------------------
    @staticmethod
    def pixel_mask_of(images: Tensor, sizes: list[tuple[int, int]]) -> Tensor:
        """1 on each image's valid pixels, 0 on the padding (HF's ``pixel_mask``)."""
        mask = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.long, device=images.device)
        for i, (h, w) in enumerate(sizes):
            mask[i, :h, :w] = 1
        return mask

    def _frame(self, images: Tensor, size: tuple[int, int]) -> tuple[int, int]:
        return size if self.hf_family.frame == "valid" else tuple(images.shape[-2:])

    def hf_labels(self, images: Tensor, targets: list[dict]) -> list[dict]:
        """Our targets → HF's ``labels``: ``class_labels`` and normalized cxcywh ``boxes``."""
        out = []
        for t, size in zip(targets, image_sizes(images, targets)):
            h, w = self._frame(images, size)
            boxes = torch.as_tensor(t["boxes"], dtype=torch.float32, device=images.device).reshape(-1, 4)
            scale = boxes.new_tensor([w, h, w, h])
            out.append({"class_labels": torch.as_tensor(t["labels"], dtype=torch.long, device=images.device),
                        "boxes": box_xyxy_to_cxcywh(boxes) / scale})
        return out

    # ---- training -------------------------------------------------------------------------
    def forward(self, images: Tensor, targets: list[dict] | None = None) -> dict[str, Tensor]:
        check_training_call(self, images, targets)
        out = super().forward(pixel_values=images, pixel_mask=self.pixel_mask_of(images, image_sizes(images, targets)),
                              labels=self.hf_labels(images, targets))
        return self.weighted_losses(out.loss_dict)

    def weighted_losses(self, loss_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """HF's loss components, each times its weight: the terms HF sums into ``outputs.loss``."""
        if self.hf_family.weighted:
            return dict(loss_dict)
        cfg = self.config
        weights = {"loss_ce": 1.0, "loss_bbox": cfg.bbox_loss_coefficient, "loss_giou": cfg.giou_loss_coefficient}
        out = {}
        for key, value in loss_dict.items():
            stem, _, layer = key.rpartition("_")  # auxiliary decoder layers: "loss_ce_0", ...
            weight = weights.get(key, weights.get(stem) if layer.isdigit() else None)
            if weight is not None:
                out[key] = value * weight
        return out

    # ---- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor, targets: list[dict] | None = None) -> list[dict]:
        was_training = self.training
        self.eval()
        try:
            sizes = image_sizes(images, targets)
            out = super().forward(pixel_values=images, pixel_mask=self.pixel_mask_of(images, sizes))
        finally:
            self.train(was_training)
        results = []
        for i, size in enumerate(sizes):
            scores, labels, query = self.select(out.logits[i].float())
            h, w = self._frame(images, size)
            boxes = box_cxcywh_to_xyxy(out.pred_boxes[i].float()[query]) * out.pred_boxes.new_tensor(
                [w, h, w, h], dtype=torch.float32)
            t = targets[i] if targets is not None else None
            results.append({"boxes": to_original_boxes(boxes, t, size), "scores": scores, "labels": labels})
        return results

    def select(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One image's ``[queries, classes]`` logits → kept (scores, labels, query index), best first."""
        if self.hf_family.sigmoid:
            prob = logits.sigmoid().flatten()
            scores, flat = prob.topk(min(self.max_detections, prob.numel()))
            labels, query = flat % logits.shape[1], flat // logits.shape[1]
        else:
            scores, labels = logits.softmax(-1)[:, :-1].max(-1)
            scores, query = scores.topk(min(self.max_detections, scores.numel()))
            labels = labels[query]
        keep = scores > self.score_thresh
        return scores[keep], labels[keep], query[keep]
