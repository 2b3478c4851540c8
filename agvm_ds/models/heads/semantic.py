"""Semantic FPN decode head (Kirillov et al., Panoptic FPN).

Every pyramid level goes through ``log2(stride / common_stride)`` blocks of
(3x3 conv, norm, ReLU, 2x bilinear upsample) - at least one conv - to reach the common stride
(4); the maps are summed and a 1x1 conv predicts per-pixel class logits, upsampled to the
input resolution. Loss: cross-entropy ignoring ``ignore_value``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from agvm_ds.models.layers import make_norm

__all__ = ["SemanticFPNHead"]


class SemanticFPNHead(nn.Module):
    def __init__(self, spec, channels: int, strides: list[int], num_classes: int):
        super().__init__()
        self.spec = spec
        self.common_stride = spec.common_stride
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            steps = max(1, int(round(math.log2(stride / spec.common_stride))))
            layers: list[nn.Module] = []
            cin = channels
            for j in range(steps):
                layers += [nn.Conv2d(cin, spec.conv_dim, 3, padding=1, bias=spec.norm == "none"),
                           make_norm(spec.norm, spec.conv_dim), nn.ReLU()]
                cin = spec.conv_dim
                if stride > spec.common_stride:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.predictor = nn.Conv2d(spec.conv_dim, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.01)  # start near uniform class scores

    def forward(self, feats: list[Tensor], out_size: tuple[int, int]) -> Tensor:
        x = None
        for head, f in zip(self.scale_heads, feats):
            y = head(f)
            x = y if x is None else x + F.interpolate(y, size=x.shape[-2:], mode="bilinear",
                                                      align_corners=False)
        logits = self.predictor(x).float()
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)

    def losses(self, feats: list[Tensor], sem_seg: Tensor) -> dict[str, Tensor]:
        logits = self(feats, sem_seg.shape[-2:])
        loss = F.cross_entropy(logits, sem_seg, ignore_index=self.spec.ignore_value)
        return {"loss_sem_seg": self.spec.loss_weight * loss}
