"""The ``data`` section of a run file.

``root: null`` (the default) selects the embedded synthetic benchmark, generated once into
``cache_dir``; a path selects a COCO-layout dataset on disk. The defaults suit the
benchmark (short side 128 px); for real COCO use e.g. ``min_size: [640, ..., 800]`` and
``max_size: 1333`` with ``train_split: "train2017"``, ``val_split: "val2017"``.

Augmentation: without ``transforms``, training resizes by ``min_size``/``max_size`` and flips
by ``flip_prob``; ``transforms`` replaces that with a list of typed steps (large-scale
jitter, random crop, photometric jitter, flip, resize: :mod:`agvm_ds.config.augment`).
Either way the steps apply to training only: evaluation resizes the short side to
``test_min_size`` (default: the largest ``min_size``) capped by ``max_size``, never flips,
crops or jitters.

Example::

    "data": {"task": "instance", "synthetic": {"train": 2000, "val": 200, "seed": 0, "size": 128},
             "min_size": [112, 128, 144], "max_size": 240, "flip_prob": 0.5}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from agvm_ds.config.augment import FlipStep, TransformStep, check_order, flip_prob_of
from agvm_ds.config.base import ConfigModel


class SyntheticConfig(ConfigModel):
    """Parameters of the embedded benchmark (used when ``data.root`` is null)."""

    train: int = Field(2000, ge=1, description="training images")
    val: int = Field(200, ge=1, description="validation images")
    seed: int = Field(0, ge=0)
    size: int = Field(128, ge=32, le=2048, description="long image side in pixels")
    workers: int = Field(1, ge=1, le=64, description="processes used to generate it")


class DataConfig(ConfigModel):
    """Validated ``data`` section; see the module docstring."""

    root: str | None = Field(None, description="COCO-layout folder; null = synthetic benchmark")
    cache_dir: str | None = Field(None, description="where the benchmark is generated; null = "
                                  "$AGVM_DS_DATA_CACHE or <repo>/.cache/data")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    task: Literal["detection", "instance", "semantic"] = "detection"
    train_split: str = Field("train", min_length=1)
    val_split: str = Field("val", min_length=1)
    image_dir: str = Field("{split}", description="image folder under root; {split} is filled in")
    ann_file: str = "annotations/instances_{split}.json"
    sem_seg_dir: str = Field("semantic/{split}", description="label-map folder (semantic task)")
    semantic_classes: int | None = Field(None, ge=1, description="number of semantic classes; "
                                         "null = read annotations/semantic_classes.json")
    reduce_zero_label: bool = Field(False, description="ADE20K style: label 0 is ignored")
    min_size: int | list[int] = Field(128, description="short side; a list = multi-scale training")
    test_min_size: int | None = Field(None, ge=1, description="short side at evaluation; "
                                      "null = the largest min_size")
    max_size: int | None = Field(224, ge=1, description="cap on the long side")
    flip_prob: float = Field(0.5, ge=0.0, le=1.0, description="training flips (without "
                             "data.transforms)")
    transforms: list[TransformStep] | None = Field(None, description="the training augmentation "
                                                   "steps (agvm_ds.config.augment); null = resize "
                                                   "by min_size/max_size, then flip by flip_prob")
    num_workers: int = Field(0, ge=0, le=64)
    image_memo_mb: int = Field(0, ge=0, description="MiB of decoded training/evaluation images "
                               "each process keeps after their first load (0: decode every time)")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    skip_invalid_boxes: bool = Field(False, description="drop (and log) boxes outside the "
                                     "image or with zero area instead of failing")
    filter_empty: bool = Field(True, description="training skips images without (non-crowd) "
                               "annotations, as detectron2 and mmdetection do by default; false "
                               "trains on them as pure background (detection / instance tasks)")

    @field_validator("min_size")
    @classmethod
    def _positive_sizes(cls, v):
        sizes = [v] if isinstance(v, int) else v
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError("must be a positive int or a non-empty list of positive ints")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v):
        if any(s <= 0 for s in v):
            raise ValueError("every std value must be > 0")
        return v

    @field_validator("image_dir", "ann_file", "sem_seg_dir")
    @classmethod
    def _template(cls, v: str):
        try:
            v.format(split="x")
        except (KeyError, IndexError, ValueError):
            raise ValueError("may only use the placeholder {split}") from None
        return v

    @field_validator("transforms")
    @classmethod
    def _order(cls, v):
        if v is not None:
            check_order(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _flip_prob_of_the_steps(cls, data):
        # with transforms, flip_prob states the pipeline's flip probability, so the resolved
        # config.json (every field written out) reads back without contradicting itself
        if isinstance(data, dict) and isinstance(data.get("transforms"), list) and "flip_prob" not in data:
            default = FlipStep.model_fields["prob"].default
            probs = [step.get("prob", default) for step in data["transforms"]
                     if isinstance(step, dict) and step.get("type") == "flip"]
            if all(isinstance(p, (int, float)) and 0 <= p <= 1 for p in probs):
                data = {**data, "flip_prob": flip_prob_of([FlipStep(type="flip", prob=p) for p in probs])}
        return data

    @model_validator(mode="after")
    def _one_flip_setting(self):
        # a run file (or a _base_ it extends) may keep flip_prob next to transforms only when
        # the two agree; otherwise one of them would be silently ignored
        if self.transforms is not None:
            p = flip_prob_of(self.transforms)
            if abs(p - self.flip_prob) > 1e-9:
                raise ValueError(f"flip_prob ({self.flip_prob}) disagrees with data.transforms "
                                 f"(flips with probability {p:g}); with transforms, set the 'flip' "
                                 "step's prob and drop flip_prob")
        return self

    @model_validator(mode="after")
    def _synthetic_splits(self):
        if self.root is None and (self.train_split, self.val_split) != ("train", "val"):
            raise ValueError("the synthetic benchmark (root: null) has splits 'train' and 'val'; "
                             "set root to use other split names")
        return self

    @property
    def eval_min_size(self) -> int:
        if self.test_min_size is not None:
            return self.test_min_size
        return self.min_size if isinstance(self.min_size, int) else max(self.min_size)
