"""Feature Pyramid Network (Lin et al. 2017).

Lateral 1x1 convs bring every backbone level to ``out_channels``; a top-down pass adds the
2x-upsampled coarser map to each finer one; a 3x3 conv smooths each sum. Extra coarser
levels are either stride-2 convs (RetinaNet's P6/P7, here computed from the P5 output) or
a stride-2 max-pool of the coarsest level (Faster R-CNN's P6, which has no parameters).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from agvm_ds.models.layers import ConvNormAct

__all__ = ["FPN"]


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], in_strides: list[int], out_channels: int = 256,
                 extra_levels: int = 0, extra_mode: str = "conv", norm: str = "none"):
        super().__init__()
        for a, b in zip(in_strides, in_strides[1:]):
            if b != 2 * a:
                raise ValueError(f"FPN needs backbone levels whose strides double, got {in_strides}")
        self.lateral = nn.ModuleList(ConvNormAct(c, out_channels, 1, norm=norm, act=None)
                                     for c in in_channels)
        self.output = nn.ModuleList(ConvNormAct(out_channels, out_channels, 3, norm=norm, act=None)
                                    for _ in in_channels)
        self.extra_mode = extra_mode
        self.extra = nn.ModuleList()
        if extra_mode == "conv":
            self.extra = nn.ModuleList(ConvNormAct(out_channels, out_channels, 3, 2, norm=norm, act=None)
                                       for _ in range(extra_levels))
        self.num_extra = extra_levels
        self.strides = list(in_strides) + [in_strides[-1] * 2 ** (i + 1) for i in range(extra_levels)]
        self.channels = [out_channels] * len(self.strides)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)  # detectron2's "c2_xavier_fill"
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        laterals = [lat(f) for lat, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            # in place: a lateral's own output is read by no backward (a conv's backward
            # needs its input, a norm's its input), so the sum can take over its buffer
            laterals[i - 1].add_(F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                               mode="nearest"))
        outs = [conv(x) for conv, x in zip(self.output, laterals)]
        for i in range(self.num_extra):
            if self.extra_mode == "pool":
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                x = outs[-1] if i == 0 else F.relu(outs[-1])
                outs.append(self.extra[i](x))
        return outs
