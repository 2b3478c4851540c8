"""The ``model`` section of a run file: which spec in ``models/`` to build, and tweaks.

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
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, field_validator, model_validator

from agvm_ds.config.base import ConfigModel
from agvm_ds.errors import ConfigError

__all__ = ["ModelConfig"]


class ModelConfig(ConfigModel):
    spec: str = Field(min_length=1, description="model spec JSON (see models/)")
    num_classes: int = Field(ge=1, description="classes of the dataset (semantic: incl. background)")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="dotted spec keys to replace, e.g. roi_box.score_thresh")
    backbone_checkpoint: Optional[str] = Field(None, description="local backbone weights file")

    @field_validator("spec")
    @classmethod
    def _spec_exists(cls, v: str) -> str:
        from agvm_ds.config.spec import resolve_spec_path

        try:
            resolve_spec_path(v)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
        return v

    @model_validator(mode="after")
    def _spec_valid(self):
        try:
            self.model_spec()
        except ConfigError as err:
            raise ValueError(f"invalid spec: {err}") from None
        return self

    def spec_overrides(self) -> dict[str, Any]:
        ov = dict(self.overrides)
        ov["num_classes"] = self.num_classes
        if self.backbone_checkpoint is not None:
            ov["backbone.checkpoint"] = self.backbone_checkpoint
        return ov

    def model_spec(self):
        """The validated :class:`agvm_ds.config.spec.ModelSpec` with overrides applied."""
        from agvm_ds.config.spec import load_spec

        return load_spec(self.spec, self.spec_overrides())
