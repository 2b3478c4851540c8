"""Model specs: one JSON file per model in ``models/``, validated by these pydantic models.

A spec fully determines a network and its AGVM partition: the architecture, every
sub-network's hyper-parameters, the ``modules`` map (module name -> parameter-name
prefixes) and the ``anchor`` module whose gradient variance the others are matched to.
Unknown keys are rejected (``extra="forbid"``) and every error names its dotted key, so a
typo fails loudly instead of silently training a default.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from agvm_ds.config.base import ConfigModel, format_validation_error
from agvm_ds.errors import ConfigError
from agvm_ds.families import spec_families
from agvm_ds.config.files import REPO_ROOT, read_json, set_dotted

__all__ = ["ModelSpec", "UniNetSpec", "UniNetStageSpec", "TimmBackboneSpec", "FPNSpec",
           "AnchorSpec", "RetinaHeadSpec", "RPNSpec", "ROIBoxSpec", "ROIMaskSpec",
           "SemanticHeadSpec", "ARCHITECTURE_SECTIONS", "DEFAULT_MODULES", "architecture_sections",
           "default_modules", "load_spec",
           "resolve_spec_path"]

# Norm layers (agvm_ds.models.layers.make_norm): bn = per-rank BatchNorm (its running
# statistics are averaged across ranks before every evaluation and checkpoint), syncbn =
# SyncBatchNorm (GPU process groups), frozen_bn = constant statistics and affine (for
# pretrained weights), gn = GroupNorm, ln = channel LayerNorm.
Norm = Literal["none", "bn", "syncbn", "frozen_bn", "gn", "ln"]
BackboneNorm = Literal["bn", "syncbn", "frozen_bn", "gn", "ln"]


class UniNetStageSpec(ConfigModel):
    block: Literal["fused_mbconv", "mbconv", "attention", "mlp"]
    channels: int = Field(gt=0)
    depth: int = Field(ge=1)
    expansion: float = Field(gt=0)
    stride: Literal[1, 2]
    kernel_size: int = Field(3, ge=1, le=9)
    se_ratio: float = Field(0.25, ge=0, le=1, description="conv blocks: SE width / input width")
    head_dim: Optional[int] = Field(None, gt=0, description="attention: defaults to the backbone's")
    window: int = Field(7, ge=1, description="mlp blocks: token-mixing window")
    downsample: Literal["auto", "local", "context"] = Field(
        "auto", description="DSM before this stage; auto = context for attention/mlp at stride 2")

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd")
        return v


class UniNetSpec(ConfigModel):
    type: Literal["uninet"]
    stem_channels: int = Field(gt=0)
    stages: list[UniNetStageSpec] = Field(min_length=1)
    head_dim: int = Field(32, gt=0)
    out_indices: list[int] = Field(min_length=1, description="0-based stages whose outputs feed the neck")
    norm: BackboneNorm = "bn"
    layer_scale_init: float = Field(1e-5, gt=0)
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    grad_checkpointing: bool = False
    checkpoint: Optional[str] = Field(None, description="local state_dict file to load")

    @model_validator(mode="after")
    def _check(self):
        idx = self.out_indices
        if sorted(set(idx)) != idx or idx[0] < 0 or idx[-1] >= len(self.stages):
            raise ValueError(f"out_indices {idx} must be increasing stage indices in "
                             f"0..{len(self.stages) - 1}")
        if idx[-1] != len(self.stages) - 1:
            raise ValueError(f"out_indices {idx} must end with the last stage "
                             f"({len(self.stages) - 1}); later stages would never get a gradient")
        for i, st in enumerate(self.stages):
            hd = st.head_dim or self.head_dim
            if st.block == "attention" and st.channels % hd:
                raise ValueError(f"stages.{i}: channels {st.channels} not divisible by head_dim {hd}")
        return self


class TimmBackboneSpec(ConfigModel):
    type: Literal["timm"]
    name: str = Field(description="any timm model name that supports features_only")
    out_indices: Optional[list[int]] = Field(
        None, description="timm feature indices; default: the last (up to) 4 with stride >= 4")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model kwargs")
    checkpoint: Optional[str] = Field(None, description="local weights file (timm format)")
    norm: Literal["bn", "syncbn", "frozen_bn"] = Field(
        "bn", description="what timm's BatchNorms become (after loading checkpoint); "
                          "other norms come through kwargs (e.g. norm_layer)")


class FPNSpec(ConfigModel):
    type: Literal["fpn"] = "fpn"
    out_channels: int = Field(256, gt=0)
    extra_levels: int = Field(0, ge=0, le=3, description="levels added above the last backbone level")
    extra_mode: Literal["conv", "pool"] = Field(
        "conv", description="conv: stride-2 3x3 convs (RetinaNet P6/P7); pool: max-pool (R-CNN P6)")
    norm: Norm = "none"


class AnchorSpec(ConfigModel):
    size_per_stride: float = Field(4.0, gt=0, description="anchor size = this x level stride")
    scales_per_octave: int = Field(3, ge=1)
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1)
    offset: float = Field(0.0, ge=0, le=1)


class RetinaHeadSpec(ConfigModel):
    num_convs: int = Field(4, ge=0)
    norm: Norm = "none"
    anchors: AnchorSpec = Field(default_factory=AnchorSpec)
    fg_iou: float = Field(0.5, gt=0, le=1)
    bg_iou: float = Field(0.4, ge=0, le=1)
    allow_low_quality: bool = True
    focal_alpha: float = 0.25
    focal_gamma: float = Field(2.0, ge=0)
    box_loss: Literal["smooth_l1", "giou"] = "smooth_l1"
    smooth_l1_beta: float = Field(0.1, ge=0)
    prior_prob: float = Field(0.01, gt=0, lt=1)
    score_thresh: float = Field(0.05, ge=0, le=1)
    topk_candidates: int = Field(1000, ge=1)
    nms_thresh: float = Field(0.5, gt=0, le=1)
    max_detections: int = Field(100, ge=1)


class RPNSpec(ConfigModel):
    anchors: AnchorSpec = Field(default_factory=lambda: AnchorSpec(size_per_stride=8.0, scales_per_octave=1))
    num_convs: int = Field(1, ge=1)
    fg_iou: float = Field(0.7, gt=0, le=1)
    bg_iou: float = Field(0.3, ge=0, le=1)
    batch_size_per_image: int = Field(256, ge=1)
    positive_fraction: float = Field(0.5, gt=0, le=1)
    pre_nms_topk_train: int = Field(2000, ge=1)
    pre_nms_topk_test: int = Field(1000, ge=1)
    post_nms_topk_train: int = Field(1000, ge=1)
    post_nms_topk_test: int = Field(1000, ge=1)
    nms_thresh: float = Field(0.7, gt=0, le=1)
    min_box_size: float = Field(0.0, ge=0)
    smooth_l1_beta: float = Field(0.0, ge=0)
    loss_weight: float = Field(1.0, ge=0)


class ROIBoxSpec(ConfigModel):
    pooler_resolution: int = Field(7, ge=1)
    sampling_ratio: int = Field(2, ge=0, description="0 = adaptive (ceil(roi / bin))")
    num_convs: int = Field(0, ge=0)
    conv_dim: int = Field(256, gt=0)
    num_fcs: int = Field(2, ge=0)
    fc_dim: int = Field(1024, gt=0)
    norm: Norm = "none"
    fg_iou: float = Field(0.5, gt=0, le=1)
    batch_size_per_image: int = Field(512, ge=1)
    positive_fraction: float = Field(0.25, gt=0, le=1)
    box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    smooth_l1_beta: float = Field(0.0, ge=0)
    cls_agnostic_box: bool = False
    canonical_box_size: float = Field(224.0, gt=0)
    canonical_level: int = Field(4, ge=0)
    score_thresh: float = Field(0.05, ge=0, le=1)
    nms_thresh: float = Field(0.5, gt=0, le=1)
    max_detections: int = Field(100, ge=1)


class ROIMaskSpec(ConfigModel):
    pooler_resolution: int = Field(14, ge=1)
    sampling_ratio: int = Field(2, ge=0)
    num_convs: int = Field(4, ge=0)
    conv_dim: int = Field(256, gt=0)
    norm: Norm = "none"
    mask_threshold: float = Field(0.5, gt=0, lt=1)


class SemanticHeadSpec(ConfigModel):
    conv_dim: int = Field(128, gt=0)
    common_stride: int = Field(4, ge=1)
    norm: Norm = "gn"
    ignore_value: int = 255
    loss_weight: float = Field(1.0, ge=0)


def architecture_sections() -> dict[str, tuple[str, ...]]:
    """Spec family name -> the spec sections it uses (rows of :mod:`agvm_ds.families`)."""
    return {name: row.spec_sections for name, row in spec_families().items()}


def default_modules(architecture: str) -> dict[str, list[str]]:
    """The AGVM modules of a spec family when its spec names none."""
    return {m: list(p) for m, p in spec_families()[architecture].default_modules}


_OPTIONAL_SECTIONS = ("head", "rpn", "roi_box", "roi_mask", "decode")
#: the package's own architectures as they stand at import (register_family may add more)
ARCHITECTURE_SECTIONS = architecture_sections()
DEFAULT_MODULES = {name: default_modules(name) for name in ARCHITECTURE_SECTIONS}


class ModelSpec(ConfigModel):
    name: str
    description: str = ""
    architecture: str = Field(description="a spec family of agvm_ds.families (retinanet, faster_rcnn, ...)")
    num_classes: int = Field(80, ge=1, description="semantic_fpn: including background")
    backbone: Annotated[Union[UniNetSpec, TimmBackboneSpec], Field(discriminator="type")]
    neck: FPNSpec = Field(default_factory=FPNSpec)
    head: Optional[RetinaHeadSpec] = None
    rpn: Optional[RPNSpec] = None
    roi_box: Optional[ROIBoxSpec] = None
    roi_mask: Optional[ROIMaskSpec] = None
    decode: Optional[SemanticHeadSpec] = None
    modules: dict[str, list[str]] = Field(
        None, description="AGVM module -> parameter-name prefixes; default per architecture")
    anchor: str = Field("backbone", description="AGVM anchor module")

    @model_validator(mode="before")
    @classmethod
    def _fill_sections(cls, data):
        """Sections the architecture needs default to their standard settings when omitted."""
        sections = architecture_sections()
        if isinstance(data, dict) and data.get("architecture") in sections:
            data = dict(data)
            for key in sections[data["architecture"]]:
                if data.get(key) is None:
                    data[key] = {}
            if data.get("modules") is None:
                data["modules"] = default_modules(data["architecture"])
        return data

    @field_validator("architecture")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in spec_families():
            raise ValueError(f"{v!r} is not a spec family (one of {', '.join(spec_families())})")
        return v

    @model_validator(mode="after")
    def _check(self):
        needed = architecture_sections()[self.architecture]
        for key in _OPTIONAL_SECTIONS:
            if key not in needed and getattr(self, key) is not None:
                raise ValueError(f"{key}: not used by architecture {self.architecture!r} "
                                 f"(it uses {', '.join(needed)})")
        if not self.modules:
            raise ValueError("modules: must name at least one module")
        for name, prefixes in self.modules.items():
            if not prefixes or any(not p.strip(". ") for p in prefixes):
                raise ValueError(f"modules.{name}: needs non-empty parameter-name prefixes")
        if self.anchor not in self.modules:
            raise ValueError(f"anchor: {self.anchor!r} is not one of modules ({', '.join(self.modules)})")
        return self

    def module_partition(self) -> dict[str, list[str]]:
        """``modules`` with the anchor first (the order AGVM reports them in)."""
        order = [self.anchor] + [m for m in self.modules if m != self.anchor]
        return {m: list(self.modules[m]) for m in order}


def resolve_spec_path(path: str | Path) -> Path:
    """A spec path as given, relative to the repo root, or a bare name in ``models/``."""
    p = Path(path).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [REPO_ROOT / p, Path.cwd() / p]
        if len(p.parts) == 1:  # a bare name: models/<name> or models/<name>.json
            candidates += [REPO_ROOT / "models" / p] + ([REPO_ROOT / "models" / f"{p}.json"]
                                                        if p.suffix != ".json" else [])
    candidates = list(dict.fromkeys(candidates))
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"model spec {str(path)!r} not found (looked in "
                            f"{', '.join(str(c) for c in candidates)})")


def apply_overrides(data: dict, overrides: dict[str, Any], section: str = "overrides") -> dict:
    """Set dotted keys (``"roi_box.score_thresh"``, ``"backbone.stages.0.depth"``) in a copy."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        set_dotted(data, dotted.split("."), value, f"{section}.{dotted}")
    return data


def load_spec(spec: "ModelSpec | dict | str | Path", overrides: dict[str, Any] | None = None) -> ModelSpec:
    """Validate a spec given as a :class:`ModelSpec`, a dict, or a JSON path.

    Raises :class:`ConfigError` whose message names the file and the offending key.
    """
    where = "model spec"
    if isinstance(spec, ModelSpec):
        if not overrides:
            return spec
        data = spec.model_dump()
    elif isinstance(spec, dict):
        data = spec
    else:
        try:
            path = resolve_spec_path(spec)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
        where = str(path)
        data = read_json(path, what="model spec")
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{where}: {format_validation_error(err, '', ModelSpec)}") from None
