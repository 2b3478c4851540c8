"""UniNet-style hybrid backbone: conv, transformer and MLP stages behind one stem.

Layout (Liu et al., "UniNet", ECCV 2022): a stride-2 3x3 stem, then six stages with strides
1, 2, 2, 2, 1, 2 (total stride 32). Each stage is ``[down-sampling module] + depth x block``
of one kind; the down-sampling module also changes the channel count. Everything is set per
stage in the spec (:class:`agvm_ds.config.spec.UniNetStageSpec`), so the family ranges from
a ~1M-parameter model that trains on two CPU cores to the ~1B one the AGVM paper used.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from agvm_ds.models.backbones.uninet_blocks import (AttentionBlock, ContextDownsample,
                                                    FusedMBConv, MBConv, MixerBlock)
from agvm_ds.models.layers import ConvNormAct, LayerNorm2d

__all__ = ["UniNet"]


def _make_block(stage, dim: int, head_dim: int, norm: str, layer_scale: float, dp: float) -> nn.Module:
    if stage.block == "mbconv":
        return MBConv(dim, stage.expansion, stage.kernel_size, stage.se_ratio, norm, dp)
    if stage.block == "fused_mbconv":
        return FusedMBConv(dim, stage.expansion, stage.kernel_size, stage.se_ratio, norm, dp)
    if stage.block == "attention":
        return AttentionBlock(dim, stage.head_dim or head_dim, stage.expansion, layer_scale, dp)
    if stage.block == "mlp":
        return MixerBlock(dim, stage.window, stage.expansion, layer_scale, dp)
    raise ValueError(f"unknown block {stage.block!r}")


class UniNetStage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)


class UniNet(nn.Module):
    """Backbone returning the NCHW outputs of the stages listed in ``spec.out_indices``.

    Attributes ``channels`` and ``strides`` describe those outputs (what the neck needs).
    Token-based stages (attention / mlp) are followed by a channel LayerNorm on the
    returned features, since their residual stream is un-normalized.
    """

    def __init__(self, spec):
        super().__init__()
        self.grad_checkpointing = spec.grad_checkpointing
        self.stem = ConvNormAct(3, spec.stem_channels, 3, 2, norm=spec.norm)
        total = sum(s.depth for s in spec.stages)
        # python, not torch.linspace: this must also run under a meta-device context
        rates = [spec.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        cin, stride, k = spec.stem_channels, 2, 0
        self.stages = nn.ModuleList()
        strides, channels = [], []
        for st in spec.stages:
            head_dim = st.head_dim or spec.head_dim
            if st.stride == 1 and cin == st.channels:
                down: nn.Module = nn.Identity()
            else:
                context = (st.downsample == "context" or
                           (st.downsample == "auto" and st.stride == 2
                            and st.block in ("attention", "mlp")))
                down = ContextDownsample(cin, st.channels, st.stride, context, head_dim,
                                         spec.norm, spec.layer_scale_init)
            blocks = [_make_block(st, st.channels, head_dim, spec.norm, spec.layer_scale_init,
                                  rates[k + j]) for j in range(st.depth)]
            k += st.depth
            self.stages.append(UniNetStage(down, blocks))
            stride *= st.stride
            strides.append(stride)
            channels.append(st.channels)
            cin = st.channels
        self.out_indices = list(spec.out_indices)
        self.channels = [channels[i] for i in self.out_indices]
        self.strides = [strides[i] for i in self.out_indices]
        self.out_norms = nn.ModuleDict({
            str(i): LayerNorm2d(channels[i]) for i in self.out_indices
            if spec.stages[i].block in ("attention", "mlp")})
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage.downsample(x)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                for block in stage.blocks:
                    x = cp.checkpoint(block, x, use_reentrant=False)
            else:
                x = stage.blocks(x)
            if i in self.out_indices:
                norm = self.out_norms[str(i)] if str(i) in self.out_norms else None
                outs.append(norm(x) if norm is not None else x)
        return outs
