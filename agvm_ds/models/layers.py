"""Small building blocks shared by backbones, necks and heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["make_norm", "ConvNormAct", "DropPath", "LayerScale", "SqueezeExcite", "LayerNorm2d",
           "BatchNorm2d", "mixed_precision_batchnorm", "convert_batchnorm", "NORM_KINDS"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (each pixel normalized on its own)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _MixedPrecisionBatchNorm:
    """BatchNorm forward that also runs with low-precision affine parameters and fp32 statistics.

    DeepSpeed's ``bf16`` / ``fp16`` modes (0.19 and later) cast a module's *parameters*
    and leave its buffers in fp32, so a BatchNorm ends up with a bf16 weight and bias but
    fp32 ``running_mean`` / ``running_var`` - a combination ``F.batch_norm`` refuses
    ("expected scalar type BFloat16 but found Float"). In that case the weight and bias are
    cast to the statistics' dtype for the call: the normalization runs in PyTorch's
    mixed-precision path (bf16 input, fp32 affine and statistics, bf16 output), the running
    statistics keep accumulating in fp32, and gradients flow back to the bf16 parameters
    through the cast. When the dtypes agree (fp32 training) this is the stock forward.
    """

    def forward(self, input: Tensor) -> Tensor:
        weight, bias, mean = self.weight, self.bias, self.running_mean
        if weight is None or mean is None or weight.dtype == mean.dtype:
            return super().forward(input)
        self._check_input_dim(input)
        weight, bias = weight.to(mean.dtype), bias.to(mean.dtype)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        use_buffers = not self.training or self.track_running_stats
        return F.batch_norm(input, mean if use_buffers else None,
                            self.running_var if use_buffers else None, weight, bias,
                            self.training, factor, self.eps)


class BatchNorm1d(_MixedPrecisionBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that accepts bf16/fp16 parameters with fp32 statistics."""


class BatchNorm2d(_MixedPrecisionBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that accepts bf16/fp16 parameters with fp32 statistics."""


class BatchNorm3d(_MixedPrecisionBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that accepts bf16/fp16 parameters with fp32 statistics."""


_MIXED_BN = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def mixed_precision_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.BatchNorm{1,2,3}d`` inside ``module`` into its mixed-precision
    subclass above, in place (same parameters, buffers and state-dict keys); returns
    ``module``. Other BatchNorm subclasses (SyncBatchNorm, timm's BatchNormAct2d) keep
    their own forward and are left alone.
    """
    for m in module.modules():
        mixed = _MIXED_BN.get(type(m))
        if mixed is not None:
            m.__class__ = mixed
    return module


NORM_KINDS = ("none", "bn", "syncbn", "frozen_bn", "gn", "ln")


def convert_batchnorm(module: nn.Module, kind: str) -> nn.Module:
    """Turn every BatchNorm of a built network (e.g. timm's) into ``kind``'s layer:
    ``"bn"`` the mixed-precision BatchNorm (statistics and parameters kept), ``"syncbn"``
    SyncBatchNorm, ``"frozen_bn"`` FrozenBatchNorm2d with the current values. Returns the
    (possibly new) root module."""
    from agvm_ds.models import norms

    if kind == "bn":
        return mixed_precision_batchnorm(module)
    if kind == "syncbn":
        return norms.sync_batchnorm(module)
    if kind == "frozen_bn":
        return norms.freeze_batchnorm(module)
    raise ValueError(f"cannot convert BatchNorm to {kind!r} (expected bn, syncbn or frozen_bn)")


def make_norm(kind: str | None, channels: int) -> nn.Module:
    """``"bn"`` BatchNorm (per-rank batch statistics), ``"syncbn"`` SyncBatchNorm (statistics
    of the global batch; GPU process groups only, see :func:`~agvm_ds.models.norms.sync_batchnorm`),
    ``"frozen_bn"`` :class:`~agvm_ds.models.norms.FrozenBatchNorm2d` (constant statistics
    and affine), ``"gn"`` GroupNorm (32 groups, fewer when channels demand), ``"ln"``
    channel LayerNorm, ``None``/``"none"`` identity.

    GroupNorm is the usual choice for detection heads and for training from scratch with
    few images per device, where BatchNorm statistics are noisy. ``frozen_bn`` only makes
    sense with pretrained weights: from scratch it is a fixed identity-like scaling.
    """
    if kind in (None, "none"):
        return nn.Identity()
    if kind == "bn":
        return BatchNorm2d(channels)
    if kind == "syncbn":
        return nn.SyncBatchNorm(channels)
    if kind == "frozen_bn":
        from agvm_ds.models.norms import FrozenBatchNorm2d

        return FrozenBatchNorm2d(channels)
    if kind == "gn":
        groups = 32
        while channels % groups:
            groups //= 2
        return nn.GroupNorm(groups, channels)
    if kind == "ln":
        return LayerNorm2d(channels)
    raise ValueError(f"unknown norm {kind!r} (expected one of {', '.join(NORM_KINDS)})")


class ConvNormAct(nn.Sequential):
    """Conv -> norm -> activation; the conv has a bias only when there is no norm after it."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 norm: str | None = "bn", act: type[nn.Module] | None = nn.SiLU):
        has_norm = norm not in (None, "none")
        layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=not has_norm)]
        if has_norm:
            layers.append(make_norm(norm, cout))
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Learnable per-channel scale of a residual branch (Touvron et al., CaiT).

    Starting the scale small lets very deep attention stacks train stably: every block
    begins close to the identity. ``dim`` says which axis holds the channels.
    """

    def __init__(self, channels: int, init: float, dim: int = -1):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), float(init)))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * self.gamma.view(shape)


class SqueezeExcite(nn.Module):
    """Channel attention (Hu et al.): global pool -> bottleneck -> sigmoid gate."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        s = self.expand(F.silu(self.reduce(s)))
        return x * torch.sigmoid(s)
