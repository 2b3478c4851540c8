"""Backbones: the UniNet-style family and any timm model (features_only)."""

from __future__ import annotations

import torch
from torch import nn

from agvm_ds.models.backbones.timm_backbone import TimmBackbone
from agvm_ds.models.backbones.uninet import UniNet
from agvm_ds.models.backbones.weights import WeightsReport, load_backbone_weights

__all__ = ["build_backbone", "UniNet", "TimmBackbone", "load_backbone_weights", "WeightsReport"]


def build_backbone(spec) -> nn.Module:
    """Backbone from its spec section; exposes ``channels`` / ``strides`` of its outputs and
    ``weights_report`` (a :class:`WeightsReport` when ``spec.checkpoint`` was loaded, else None)."""
    if spec.type == "timm":
        return TimmBackbone(spec)
    model = UniNet(spec)
    model.weights_report = None
    if spec.checkpoint and torch.empty(0).device.type != "meta":
        model.weights_report = load_backbone_weights(spec.checkpoint, model)
    return model
