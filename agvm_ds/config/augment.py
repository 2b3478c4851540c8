"""The steps of ``data.transforms``: a training augmentation pipeline written as a list.

Each step is one JSON object whose ``type`` picks its class (a pydantic discriminated
union, so an unknown type or key is refused naming the step's position)::

    "transforms": [
        {"type": "large_scale_jitter", "size": 1024, "min_scale": 0.1, "max_scale": 2.0},
        {"type": "flip", "prob": 0.5},
        {"type": "photometric", "brightness": [0.875, 1.125], "contrast": [0.5, 1.5],
         "saturation": [0.5, 1.5], "hue": [-0.05, 0.05]}
    ]

Steps run in list order on the training split only; evaluation always resizes by
``data.min_size`` / ``data.test_min_size`` and ``data.max_size`` (a crop or a jitter has no
place in a measurement). Photometric steps work on the final pixels, so they come after
every geometric step. The implementations live in :mod:`agvm_ds.data.augment`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from agvm_ds.config.base import ConfigModel


def _pair(v, what: str):
    """``x`` → ``(x, x)``; a 2-list stays as it is."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return tuple(v)
    raise ValueError(f"{what} must be one number or [height, width]")


def _pixel_size(v):
    """``size`` of a crop step: one positive int or [height, width] → (height, width); None stays."""
    if v is None:
        return v
    h, w = _pair(v, "size")
    if not (isinstance(h, int) and isinstance(w, int) and h >= 1 and w >= 1):
        raise ValueError("size must be positive integers")
    return (h, w)


class ResizeStep(ConfigModel):
    """Shortest-edge resize (the pipeline without ``data.transforms`` is resize + flip)."""

    type: Literal["resize"]
    min_size: int | list[int] | None = Field(None, description="short side; a list: one drawn "
                                             "per image; null = data.min_size")
    max_size: int | None = Field(None, ge=1, description="cap on the long side; null = data.max_size")

    @field_validator("min_size")
    @classmethod
    def _positive(cls, v):
        if v is not None and (not (v if isinstance(v, list) else [v]) or
                              any(s < 1 for s in (v if isinstance(v, list) else [v]))):
            raise ValueError("must be a positive int or a non-empty list of positive ints")
        return v


class FlipStep(ConfigModel):
    """Horizontal flip with probability ``prob`` (targets record ``flipped``)."""

    type: Literal["flip"]
    prob: float = Field(0.5, ge=0.0, le=1.0)


class LargeScaleJitterStep(ConfigModel):
    """Resize to ``scale × size`` (aspect kept, scale uniform in [min_scale, max_scale]), then
    a random ``size`` crop; smaller results are padded to ``size`` (right/bottom, the mean
    colour) when ``pad`` is true, as detectron2's ResizeScale + FixedSizeCrop do."""

    type: Literal["large_scale_jitter"]
    size: int | tuple[int, int] = Field(..., description="target (height, width) in pixels")
    min_scale: float = Field(0.1, gt=0.0, le=10.0)
    max_scale: float = Field(2.0, gt=0.0, le=10.0)
    pad: bool = Field(True, description="pad the image to size (a fixed batch shape)")
    min_area: float = Field(1.0, ge=0.0, description="boxes smaller than this (px²) after the "
                            "crop are dropped")

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        return _pixel_size(v)

    @model_validator(mode="after")
    def _range(self):
        if self.min_scale > self.max_scale:
            raise ValueError(f"min_scale ({self.min_scale}) must be <= max_scale ({self.max_scale})")
        return self


class RandomCropStep(ConfigModel):
    """A crop at a uniformly drawn offset; boxes are clipped to it, and instances whose box
    area falls below ``min_area`` (or whose mask empties) are dropped with their labels."""

    type: Literal["random_crop"]
    size: int | tuple[int, int] | None = Field(None, description="absolute (height, width)")
    relative: float | tuple[float, float] | None = Field(None, description="fraction of the "
                                                         "image's (height, width)")
    min_area: float = Field(1.0, ge=0.0, description="px² a clipped box needs to stay")

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        return _pixel_size(v)

    @field_validator("relative")
    @classmethod
    def _relative(cls, v):
        if v is None:
            return v
        fh, fw = _pair(v, "relative")
        if not (0.0 < fh <= 1.0 and 0.0 < fw <= 1.0):
            raise ValueError("relative fractions must be in (0, 1]")
        return (float(fh), float(fw))

    @model_validator(mode="after")
    def _one_size(self):
        if (self.size is None) == (self.relative is None):
            raise ValueError("give exactly one of size (pixels) or relative (fractions)")
        return self


class PhotometricStep(ConfigModel):
    """Colour jitter on pixels in [0, 1], before normalization: each factor is drawn
    uniformly from its [min, max] per image, applied in the order brightness, contrast,
    saturation, hue (torchvision's ColorJitter formulas; hue shifts are in turns)."""

    type: Literal["photometric"]
    brightness: tuple[float, float] = Field((1.0, 1.0), description="multiplier range")
    contrast: tuple[float, float] = Field((1.0, 1.0), description="blend-with-mean-grey range")
    saturation: tuple[float, float] = Field((1.0, 1.0), description="blend-with-grey range")
    hue: tuple[float, float] = Field((0.0, 0.0), description="hue shift range in turns")

    @model_validator(mode="after")
    def _ranges(self):
        for name in ("brightness", "contrast", "saturation"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi:
                raise ValueError(f"{name} must be [min, max] with 0 <= min <= max, got {[lo, hi]}")
        lo, hi = self.hue
        if not -0.5 <= lo <= hi <= 0.5:
            raise ValueError(f"hue must be [min, max] within [-0.5, 0.5], got {[lo, hi]}")
        return self


TransformStep = Annotated[Union[ResizeStep, FlipStep, LargeScaleJitterStep, RandomCropStep,
                                PhotometricStep], Field(discriminator="type")]
GEOMETRIC = ("resize", "flip", "large_scale_jitter", "random_crop")


def check_order(steps: list) -> None:
    """Photometric steps come last: they act on the pixels the network sees."""
    seen_colour = False
    for k, step in enumerate(steps):
        if step.type == "photometric":
            seen_colour = True
        elif seen_colour:
            raise ValueError(f"step {k} ({step.type!r}) comes after a 'photometric' step; put the "
                             "geometric steps first (colour jitter works on the final pixels)")


def flip_prob_of(steps: list) -> float:
    """The probability that a pipeline flips an image an odd number of times."""
    p = 0.0
    for step in steps:
        if step.type == "flip":
            p = p * (1 - step.prob) + (1 - p) * step.prob
    return p
