"""Model families: one frozen row each — how the launcher builds a network, what it predicts,
where its AGVM partition comes from. Like :mod:`agvm_ds.optim.registry` for optimizers.

A run file's ``model`` section names its network in one of three ways (``model.builder``,
or ``model.spec`` for the package's own spec files):

* a registered family name (a row below, or one added with :func:`register_family`);
* a torchvision detection constructor, ``"torchvision.models.detection.fcos_resnet50_fpn"``
  (:data:`TORCHVISION_DETECTORS`), wrapped so it follows the package contract
  (``agvm_ds.models.detectors.torchvision_adapter``);
* a user's ``"package.module:function"`` (imported only by the training launcher and the
  Python API, and by ``load_model`` only with ``trust_code=True``).

Adding a family is one row::

    register_family(Family("my_detr", "my_package.detectors:build", task="boxes",
                           partition="inferred", note="my DETR variant"))

(or one more entry in :data:`ROWS` for a family the package ships). The row's ``target`` is
imported on first use, never by the read-only config check. How it is called:

* a *spec* family (``spec_sections`` set: the package's own architectures) is a class taking
  the validated :class:`agvm_ds.config.spec.ModelSpec`: ``target(spec)``; the spec's
  ``architecture`` is the row's name, ``spec_sections`` the spec sections it uses (the
  others must be absent) and ``default_modules`` the AGVM partition when the spec names none;
* any other family is a function ``target(num_classes=N, **model.kwargs) -> nn.Module``
  where ``N`` is ``model.num_classes`` (the dataset's classes, labels ``0..N-1``).

Either way the module follows the package contract (``agvm_ds/models/detectors/base.py``):
``model(images, targets)`` → dict of scalar losses, ``model.predict(images, targets)`` → one
dict per image in original image coordinates. ``task`` says what ``predict`` returns and
which ``data.task`` it trains on: ``"boxes"`` (boxes, scores, labels), ``"masks"`` (and
instance ``masks``), ``"semantic"`` (a ``sem_seg`` map). ``partition`` says where the AGVM
partition comes from: ``"declared"`` — the module sets ``agvm_modules`` / ``agvm_anchor``;
``"inferred"`` — :func:`agvm_ds.partition.infer_partition` reads it from attribute names
(extend :mod:`agvm_ds.layouts` when no layout fits). ``check``, optional, is a
``"module:function"`` the config check calls with ``model.kwargs`` (raise ``ValueError``
naming the key); it must be cheap and must not import the model's code.

Pure data and a lookup: nothing here imports the rest of the package but its error type.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from agvm_ds.errors import ConfigError

__all__ = ["Family", "FAMILIES", "ROWS", "TASKS", "TORCHVISION_PREFIX", "TORCHVISION_DETECTORS",
           "register_family", "lookup", "get_family", "spec_families", "builder_kind", "import_target",
           "task_fits"]

Task = Literal["boxes", "masks", "semantic"]
TASKS: tuple[str, ...] = ("boxes", "masks", "semantic")


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring for how ``target`` is called)."""

    name: str
    target: str                                   # "module:callable", imported on first use
    task: Task                                    # what predict returns: boxes / masks / semantic
    partition: Literal["declared", "inferred"]    # agvm_modules on the module, or infer_partition
    spec_sections: Optional[tuple[str, ...]] = None  # set: built from a model spec (target(spec))
    default_modules: tuple[tuple[str, tuple[str, ...]], ...] = ()  # spec families: AGVM modules
    check: Optional[str] = None                   # "module:function(kwargs)", cheap, no model code
    note: str = ""

    @property
    def from_spec(self) -> bool:
        return self.spec_sections is not None

    def load(self) -> Callable:
        """Import ``target`` (ConfigError naming ``model.builder`` if that fails)."""
        return import_target(self.target, f"model.builder: family {self.name!r}")

    def check_kwargs(self, kwargs: dict[str, Any]) -> None:
        """The row's own cheap check of ``model.kwargs`` (ConfigError naming the key)."""
        if self.check is None:
            return
        check = import_target(self.check, f"model.builder: family {self.name!r} check")
        try:
            check(dict(kwargs))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.kwargs: {err}") from None


def _modules(**parts: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple(parts.items())


_DENSE = dict(backbone=("backbone",), neck=("neck",))

ROWS: tuple[Family, ...] = (
    Family("retinanet", "agvm_ds.models.detectors.retinanet:RetinaNet", task="boxes", partition="declared",
           spec_sections=("head",), default_modules=_modules(**_DENSE, head=("head",))),
    Family("faster_rcnn", "agvm_ds.models.detectors.rcnn:FasterRCNN", task="boxes", partition="declared",
           spec_sections=("rpn", "roi_box"),
           default_modules=_modules(**_DENSE, rpn=("rpn",), roi_box=("roi_box",))),
    Family("mask_rcnn", "agvm_ds.models.detectors.rcnn:MaskRCNN", task="masks", partition="declared",
           spec_sections=("rpn", "roi_box", "roi_mask"),
           default_modules=_modules(**_DENSE, rpn=("rpn",), roi_box=("roi_box",), roi_mask=("roi_mask",))),
    Family("semantic_fpn", "agvm_ds.models.detectors.semantic_fpn:SemanticFPN", task="semantic",
           partition="declared", spec_sections=("decode",),
           default_modules=_modules(**_DENSE, decode=("decode",))),
    # Hugging Face transformers, built from config (model.kwargs: the *Config's keyword
    # arguments), random weights, nothing downloaded; partition from agvm_ds.layouts
    *(Family(f"hf_{t}", f"agvm_ds.models.foreign.hf_detr:build_{t}", task="boxes", partition="inferred",
             check=f"agvm_ds.models.foreign.hf_detr:check_{t}", note=f"Hugging Face {name} from its config")
      for t, name in (("detr", "DETR"), ("deformable_detr", "Deformable DETR"), ("rt_detr", "RT-DETR"))),
)

#: name → row: the package's rows, then whatever :func:`register_family` adds (in order)
FAMILIES: dict[str, Family] = {row.name: row for row in ROWS}


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Add ``family`` to :data:`FAMILIES` (``replace`` to redefine a name); return it."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family takes a Family row, got {type(family).__name__}")
    if family.task not in TASKS:
        raise ValueError(f"family {family.name!r}: task {family.task!r} is not one of {TASKS}")
    if family.partition not in ("declared", "inferred"):
        raise ValueError(f"family {family.name!r}: partition must be 'declared' or 'inferred'")
    if ":" not in family.target or builder_kind(family.name) != "family":
        raise ValueError(f"family {family.name!r}: needs a plain name (no '.' or ':') and a "
                         f"'module:callable' target, got {family.target!r}")
    if family.name in FAMILIES and not replace and FAMILIES[family.name] != family:
        raise ValueError(f"family {family.name!r} is already registered (pass replace=True)")
    FAMILIES[family.name] = family
    return family


def lookup(name: str) -> Optional[Family]:
    """The row of a family name, without importing anything; None if unknown."""
    return FAMILIES.get(str(name).strip())


def get_family(name: str) -> Family:
    row = lookup(name)
    if row is None:
        raise ConfigError(f"model.builder: unknown family {name!r} (registered: {', '.join(FAMILIES)}; or a "
                          f"torchvision constructor '{TORCHVISION_PREFIX}<name>', or 'package.module:function')")
    return row


def spec_families() -> dict[str, Family]:
    """The families built from a model spec (``ModelSpec.architecture`` takes their names)."""
    return {n: f for n, f in FAMILIES.items() if f.from_spec}


def task_fits(family_task: str, data_task: str) -> bool:
    """Whether a family predicting ``family_task`` trains and evaluates on ``data.task``:
    box models on detection or instance data, mask models on instance data, semantic on semantic."""
    fits = {"boxes": ("detection", "instance"), "masks": ("instance",), "semantic": ("semantic",)}
    return data_task in fits[family_task]


# -- torchvision: the detection constructors the adapter wraps, checked by name (no import) --

TORCHVISION_PREFIX = "torchvision.models.detection."

#: constructor → (task, whether label 0 is reserved for background: torchvision's R-CNNs)
TORCHVISION_DETECTORS: dict[str, tuple[str, bool]] = {
    "fcos_resnet50_fpn": ("boxes", False),
    "retinanet_resnet50_fpn": ("boxes", False),
    "retinanet_resnet50_fpn_v2": ("boxes", False),
    "fasterrcnn_resnet50_fpn": ("boxes", True),
    "fasterrcnn_resnet50_fpn_v2": ("boxes", True),
    "fasterrcnn_mobilenet_v3_large_fpn": ("boxes", True),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("boxes", True),
    "maskrcnn_resnet50_fpn": ("masks", True),
    "maskrcnn_resnet50_fpn_v2": ("masks", True),
}

#: kwargs the launcher owns: weights are never downloaded, the data pipeline alone resizes
#: and normalizes (torchvision's own transform is made the identity), num_classes is the section's
TORCHVISION_FORCED = {"weights": "always None (nothing is downloaded)",
                      "weights_backbone": "always None (nothing is downloaded; use a local checkpoint)",
                      "num_classes": "set model.num_classes (the R-CNN background class is added for you)",
                      "min_size": "the data pipeline resizes: set data.min_size",
                      "max_size": "the data pipeline resizes: set data.max_size",
                      "image_mean": "the data pipeline normalizes: set data.mean",
                      "image_std": "the data pipeline normalizes: set data.std",
                      "fixed_size": "the data pipeline resizes: set data.min_size / data.max_size",
                      "_skip_resize": "the data pipeline resizes"}


def builder_kind(text: str) -> str:
    """``"family"`` (a plain name), ``"torchvision"`` (a torchvision detection constructor
    path) or ``"user"`` (``package.module:function``); ConfigError for anything else."""
    text = str(text).strip()
    if ":" in text:
        mod, _, fn = text.partition(":")
        if mod and fn and all(p.isidentifier() for p in mod.split(".")) and fn.isidentifier():
            return "user"
    elif text.startswith(TORCHVISION_PREFIX):
        return "torchvision"
    elif text.isidentifier():
        return "family"
    raise ConfigError(f"model.builder: {text!r} is not a family name, a torchvision constructor "
                      f"('{TORCHVISION_PREFIX}<name>') or 'package.module:function'")


def import_target(target: str, what: str) -> Callable:
    """``"module:attr"`` → the attribute (ConfigError naming ``what`` if it cannot be imported)."""
    mod, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{what}: cannot import {mod}:{attr} ({err})") from None
    if not callable(obj):
        raise ConfigError(f"{what}: {mod}:{attr} is not callable")
    return obj
