"""The schema of an export's ``config.json``, checked once where the file is read.

Every reader of an export (``load_model``, and through it predict and evaluate) indexes this
record directly: ``info["class_names"]``, ``info["transform"]["min_size"]``, ``info["run"]``.
A hand-edited or truncated record would otherwise fail far from the file, as a ``KeyError``
or a ``TypeError`` inside the predictor. :func:`check_export_record` validates it (unknown
keys refused, as everywhere in agvm-ds) and returns the validated values, so ``"6"`` for
``num_classes`` is never compared with the integer a dataset counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator

from agvm_ds.config.base import ConfigModel, format_validation_error
from agvm_ds.errors import ModelFileError

FORMAT = "agvm-ds-export"


class TransformRecord(ConfigModel):
    # several sizes: test-time augmentation (agvm_ds.inference.test_time)
    min_size: Union[int, list[int]]

    @field_validator("min_size", mode="before")
    @classmethod
    def _sizes(cls, v):
        sizes = v if isinstance(v, list) else [v]
        if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
            raise ValueError(f"must be a positive integer or a non-empty list of them, got {v!r}")
        return v
    max_size: Optional[int] = Field(None, ge=1)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size_divisibility: int = Field(32, ge=1)


class FileRecord(ConfigModel):
    size: int = Field(ge=0)
    crc32: int = Field(ge=0)


class ExportRecord(ConfigModel):
    """What ``export_checkpoint`` writes (format version 1 had no ``files``)."""

    format: Literal["agvm-ds-export"]
    format_version: int = Field(1, ge=1)
    # exactly one: a spec-built network's full spec, or how a family / torchvision / user
    # builder made it (agvm_ds.models.builders.builder_record)
    model_spec: Optional[dict[str, Any]] = None
    model_builder: Optional[dict[str, Any]] = None
    task: Literal["detection", "instance", "semantic"]
    num_classes: int = Field(ge=1)
    class_names: list[str]
    category_ids: list[int]
    transform: TransformRecord
    dtype: Literal["fp32", "bf16"]
    weights: str = "model.safetensors"
    backbone_weights: str = "backbone.safetensors"
    backbone_key_prefix: str = "backbone."
    source: dict[str, Any] = {}
    run: dict[str, Any]
    score_threshold: Optional[float] = Field(None, ge=0, le=1, description="predict's default (export --score_threshold)")
    files: Optional[dict[str, FileRecord]] = None


def check_export_record(record: dict, path: Path) -> dict:
    """``record`` (the JSON object read from ``path``) validated: the same keys with the
    validated values; :class:`ModelFileError` naming ``path`` and the key otherwise."""
    try:
        valid = ExportRecord.model_validate(record)
    except ValidationError as err:
        raise ModelFileError(f"{path}: {format_validation_error(err, '', ExportRecord)}") from None
    for key in ("class_names", "category_ids"):
        if len(getattr(valid, key)) != valid.num_classes:
            raise ModelFileError(f"{path}: {key}: {len(getattr(valid, key))} entries but "
                                 f"num_classes is {valid.num_classes}")
    if (valid.model_spec is None) == (valid.model_builder is None):
        raise ModelFileError(f"{path}: needs exactly one of model_spec and model_builder")
    network = valid.model_spec if valid.model_spec is not None else valid.model_builder
    if network.get("num_classes") != valid.num_classes:
        key = "model_spec" if valid.model_spec is not None else "model_builder"
        raise ModelFileError(f"{path}: {key}.num_classes: {network.get('num_classes')!r} but "
                             f"num_classes is {valid.num_classes}")
    return valid.model_dump(mode="json", exclude_none=False,
                            exclude={k for k in ("model_spec", "model_builder", "score_threshold")
                                     if getattr(valid, k) is None})
