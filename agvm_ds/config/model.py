"""The ``model`` section of a run file: which network to build (a spec in ``models/`` or a
builder), and tweaks.

A config class only reads and validates: the network itself is built by
``agvm_ds.models.build_model(section.model_spec())``.

Example::

    "model": {"spec": "models/mask_rcnn_uninet_1b.json", "num_classes": 80,
              "overrides": {"backbone.grad_checkpointing": true, "roi_box.score_thresh": 0.01},
              "backbone_checkpoint": null}

``spec`` is a path relative to the repository root (or absolute, or a bare name in
``models/``). ``num_classes`` replaces the spec's (for ``semantic_fpn`` it counts the
background class). ``overrides`` sets dotted keys of the spec before it is validated, so
one spec serves many runs; ``backbone_checkpoint`` is shorthand for the override
``backbone.checkpoint`` (a local weights file - nothing is ever downloaded). The spec is
read and validated when this section is, so a bad spec fails before any heavy work.

Instead of ``spec`` (exactly one of the two), ``builder`` names a model family
(:mod:`agvm_ds.families`) with ``kwargs``::

    "model": {"builder": "torchvision.models.detection.fcos_resnet50_fpn", "num_classes": 6,
              "kwargs": {"trainable_backbone_layers": 1}}

* a registered family name: a spec family (``"retinanet"``) reads ``kwargs`` as the spec
  body (``overrides`` apply to it); any other family is called
  ``target(num_classes=..., **kwargs)``;
* ``"torchvision.models.detection.<constructor>"``: built with ``weights=None`` and
  ``weights_backbone=None`` (never a download) and wrapped so the package's data pipeline
  alone resizes and normalizes (the kwargs the launcher owns are refused);
* ``"package.module:function"``: the user's code, called ``function(num_classes=...,
  **kwargs)``; it is imported only by the training launcher and the Python API (a read-only
  check of the file reports it as not checked).
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, field_validator, model_validator

from agvm_ds.config.base import ConfigModel
from agvm_ds.errors import ConfigError
from agvm_ds import families

__all__ = ["ModelConfig"]


class ModelConfig(ConfigModel):
    spec: Optional[str] = Field(None, min_length=1, description="model spec JSON (see models/)")
    builder: Optional[str] = Field(None, min_length=1, description="instead of spec: a family name, "
                                   "torchvision.models.detection.<constructor> or package.module:function")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="builder's keyword arguments")
    num_classes: int = Field(ge=1, description="classes of the dataset (semantic: incl. background)")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="dotted spec keys to replace, e.g. roi_box.score_thresh")
    backbone_checkpoint: Optional[str] = Field(None, description="local backbone weights file")

    @field_validator("spec")
    @classmethod
    def _spec_exists(cls, v: Optional[str]) -> Optional[str]:
        from agvm_ds.config.spec import resolve_spec_path

        if v is None:
            return v
        try:
            resolve_spec_path(v)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
        return v

    @model_validator(mode="after")
    def _spec_valid(self):
        if (self.spec is None) == (self.builder is None):
            raise ValueError("give exactly one of model.spec (a spec file) and model.builder (a family, a "
                             "torchvision constructor or package.module:function)"
                             + (", not both" if self.spec else ""))
        kind = self.builder_kind
        if kind != "spec" and not (kind == "family" and self.family.from_spec):
            if self.overrides or self.backbone_checkpoint is not None:
                raise ValueError("model.overrides / model.backbone_checkpoint: only for spec-built models "
                                 f"(model.spec or a spec family); give {self.builder!r} its model.kwargs")
        if kind == "spec" and self.kwargs:
            raise ValueError("model.kwargs: only with model.builder (a spec takes model.overrides)")
        try:
            if kind == "torchvision":
                _check_torchvision(self.builder, self.kwargs)
            elif kind == "family" and not self.family.from_spec:
                self.family.check_kwargs(self.kwargs)
            if self.is_spec_built:
                self.model_spec()
        except ConfigError as err:
            raise ValueError(f"invalid {'spec' if self.is_spec_built else 'builder'}: {err}") from None
        return self

    @property
    def builder_kind(self) -> str:
        """``"spec"``, ``"family"``, ``"torchvision"`` or ``"user"`` (package.module:function)."""
        return "spec" if self.builder is None else families.builder_kind(self.builder)

    @property
    def family(self):
        """The registered :class:`agvm_ds.families.Family` ``builder`` names (kind ``"family"``)."""
        return families.get_family(self.builder)

    @property
    def is_spec_built(self) -> bool:
        """Built from a :class:`~agvm_ds.config.spec.ModelSpec` (a spec file or a spec family)."""
        kind = self.builder_kind
        return kind == "spec" or (kind == "family" and self.family.from_spec)

    @property
    def task(self) -> Optional[str]:
        """What the network predicts (boxes / masks / semantic); None for user code (unknown
        until it is built)."""
        kind = self.builder_kind
        if kind == "user":
            return None
        if kind == "torchvision":
            return families.TORCHVISION_DETECTORS[self.builder[len(families.TORCHVISION_PREFIX):]][0]
        return families.get_family(self.model_spec().architecture if self.is_spec_built else self.builder).task

    def spec_overrides(self) -> dict[str, Any]:
        ov = dict(self.overrides)
        ov["num_classes"] = self.num_classes
        if self.backbone_checkpoint is not None:
            ov["backbone.checkpoint"] = self.backbone_checkpoint
        return ov

    def model_spec(self):
        """The validated :class:`agvm_ds.config.spec.ModelSpec` with overrides applied (a
        spec file, or a spec family's ``kwargs``); ConfigError for other builders."""
        from agvm_ds.config.spec import load_spec

        if self.spec is not None:
            return load_spec(self.spec, self.spec_overrides())
        if not self.is_spec_built:
            raise ConfigError(f"model.builder: {self.builder!r} is not built from a model spec")
        body = {"name": self.builder, **self.kwargs, "architecture": self.builder}
        return load_spec(body, self.spec_overrides())


def _check_torchvision(builder: str, kwargs: dict[str, Any]) -> None:
    """A torchvision constructor the adapter knows, without kwargs the launcher owns (by name:
    nothing is imported)."""
    name = builder[len(families.TORCHVISION_PREFIX):]
    if name not in families.TORCHVISION_DETECTORS:
        raise ConfigError(f"model.builder: {builder!r} is not a torchvision detection constructor the adapter "
                          f"wraps (one of {', '.join(families.TORCHVISION_DETECTORS)})")
    for key, why in families.TORCHVISION_FORCED.items():
        if key in kwargs:
            raise ConfigError(f"model.kwargs.{key}: not settable for a torchvision builder ({why})")
