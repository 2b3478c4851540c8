"""Backbones: the UniNet-style family and any timm model (features_only)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from agvm_ds.errors import ConfigError
from agvm_ds.models.backbones.timm_backbone import TimmBackbone
from agvm_ds.models.backbones.uninet import UniNet
from agvm_ds.models.backbones.weights_file import read_weights_file

__all__ = ["build_backbone", "UniNet", "TimmBackbone"]


def build_backbone(spec) -> nn.Module:
    """Backbone from its spec section; exposes ``channels`` / ``strides`` of its outputs."""
    if spec.type == "timm":
        return TimmBackbone(spec)
    model = UniNet(spec)
    if spec.checkpoint and torch.empty(0).device.type != "meta":
        load_checkpoint(model, spec.checkpoint)
    return model


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a local state dict (optionally nested under "state_dict"/"model") strictly."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"backbone.checkpoint: {p} does not exist")
    state = read_weights_file(p)  # a pickle of anything but tensors: one line, nothing run
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"backbone.checkpoint: {p} does not fit this backbone "
                          f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
