"""Any timm model as a detection backbone, through ``features_only``.

timm's feature wrappers return the chosen stage outputs plus ``feature_info`` (channels and
reduction of each). Hierarchical transformers such as Swin produce NHWC maps; those are
permuted to the NCHW the necks expect, based on the wrapper's ``output_fmt``.

``norm`` converts timm's BatchNorms: ``bn`` keeps them (per-rank statistics), ``syncbn``
makes them SyncBatchNorm, ``frozen_bn`` FrozenBatchNorm2d (the detectron2 / mmdetection
default for pretrained backbones; from random weights it only rescales).

Weights start random. Pretrained weights come only from a local file (``checkpoint``),
loaded into the ``features_only`` model by
:func:`~agvm_ds.models.backbones.weights.load_backbone_weights` before any BatchNorm is
converted (so ``frozen_bn`` freezes the checkpoint's statistics). timm's model-specific
checkpoint filters (e.g. resizing a ViT's position table) are not applied: a tensor of
another shape is refused, naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from agvm_ds.errors import ConfigError
from agvm_ds.models.backbones.weights import load_backbone_weights
from agvm_ds.models.layers import convert_batchnorm
from agvm_ds.models.norms import count_batchnorms

__all__ = ["TimmBackbone"]

# Swin & co. fix the input size at construction unless told otherwise; detection inputs vary.
_DYNAMIC_SIZE_KWARGS = {"swin": {"strict_img_size": False}}


def _on_meta_device() -> bool:
    return torch.empty(0).device.type == "meta"


class TimmBackbone(nn.Module):
    def __init__(self, spec):
        super().__init__()
        import timm  # deferred: importing timm costs seconds

        kwargs = dict(spec.kwargs)
        for key, extra in _DYNAMIC_SIZE_KWARGS.items():
            if key in spec.name:
                for k, v in extra.items():
                    kwargs.setdefault(k, v)
        load = bool(spec.checkpoint) and not _on_meta_device()
        if load and not Path(spec.checkpoint).expanduser().is_file():  # before building
            raise ConfigError(f"backbone.checkpoint: {Path(spec.checkpoint).expanduser()} does not exist")
        def create(out_indices):
            extra = {} if out_indices is None else {"out_indices": tuple(out_indices)}
            try:
                return timm.create_model(spec.name, pretrained=False, features_only=True,
                                         **extra, **kwargs)
            except RuntimeError as err:  # unknown model / no feature support
                raise ConfigError(f"backbone.name: timm cannot build {spec.name!r} with "
                                  f"features_only ({err})") from None
            except TypeError as err:  # a bad entry in kwargs
                raise ConfigError(f"backbone.kwargs: {err}") from None

        model = create(spec.out_indices)
        if not spec.out_indices:  # keep the last (up to) four levels with stride >= 4
            reductions = model.feature_info.reduction()
            wanted = [i for i, r in enumerate(reductions) if r >= 4][-4:]
            if len(wanted) != len(reductions):
                model = create(wanted)
        if spec.norm != "bn" and not count_batchnorms(model):
            raise ConfigError(f"backbone.norm: {spec.norm!r} converts BatchNorm layers, but timm's "
                              f"{spec.name!r} has none")
        self.weights_report = load_backbone_weights(spec.checkpoint, model) if load else None
        # timm builds plain nn.BatchNorm2d layers: "bn" makes them run under DeepSpeed's bf16
        # mode, "syncbn"/"frozen_bn" replace them (after any checkpoint was loaded into them)
        self.body = convert_batchnorm(model, spec.norm)
        self.nhwc = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")
        self.channels = list(model.feature_info.channels())
        self.strides = list(model.feature_info.reduction())

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.body(x)
        if self.nhwc:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return [f.contiguous() for f in feats]
