"""Necks: feature pyramids on top of a backbone."""

from agvm_ds.models.necks.fpn import FPN

__all__ = ["FPN", "build_neck"]


def build_neck(spec, backbone) -> FPN:
    return FPN(backbone.channels, backbone.strides, spec.out_channels, spec.extra_levels,
               spec.extra_mode, spec.norm)
