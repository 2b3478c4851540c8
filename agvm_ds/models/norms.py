"""Norm layers beyond torch's own: frozen BatchNorm, conversions, and rank-averaged statistics.

* :class:`FrozenBatchNorm2d` - BatchNorm with statistics *and* affine fixed:
  ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, computed as one
  per-channel scale and shift. All four tensors are buffers, so the layer owns no
  parameter at all: AGVM's partition, the optimizer's param groups and DeepSpeed never
  see it, and no gradient can reach it. It is what detectron2 / mmdetection use with
  ImageNet-pretrained backbones (batches of 1-2 images per device are too small to
  re-estimate statistics).
* :func:`freeze_batchnorm` / :func:`sync_batchnorm` - convert every BatchNorm inside a
  module (timm backbones build plain ``nn.BatchNorm2d``).
* :func:`average_batchnorm_statistics` - make every rank's BatchNorm running statistics
  equal by averaging them over the data-parallel ranks (see its docstring).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from agvm_ds import collectives

__all__ = ["FrozenBatchNorm2d", "freeze_batchnorm", "sync_batchnorm", "count_batchnorms",
           "averaged_batchnorms", "average_batchnorm_statistics"]

_BN = nn.modules.batchnorm._BatchNorm


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine are constants (buffers, no parameters).

    ``forward(x) = x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)``
    and ``shift = bias - running_mean * scale``, per channel, in the buffers' precision
    and cast to ``x``'s dtype (bf16 activations keep fp32 statistics). State-dict keys
    are those of ``nn.BatchNorm2d`` minus ``num_batches_tracked`` (which is dropped when
    a BatchNorm checkpoint is loaded), so BatchNorm weights load directly.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = int(num_features), float(eps)
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # a BatchNorm checkpoint carries a step counter that means nothing once frozen
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def from_batchnorm(cls, bn: _BN) -> "FrozenBatchNorm2d":
        """A frozen copy of ``bn``'s current statistics and affine (identity affine if none)."""
        source = next(iter(list(bn.parameters()) + list(bn.buffers())), None)
        frozen = cls(bn.num_features, bn.eps)
        if source is not None:
            frozen = frozen.to(device=source.device)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight.detach())
                frozen.bias.copy_(bn.bias.detach())
            if bn.running_mean is not None:
                frozen.running_mean.copy_(bn.running_mean)
                frozen.running_var.copy_(bn.running_var)
        return frozen


def _replace(module: nn.Module, convert) -> nn.Module:
    """Apply ``convert(child) -> new child or None`` depth-first; returns the (new) root."""
    new = convert(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        replaced = _replace(child, convert)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every 2-d BatchNorm (incl. SyncBatchNorm and subclasses) becomes a
    :class:`FrozenBatchNorm2d` with its current values; returns the (possibly new) root.

    A subclass that fuses an activation (timm's ``BatchNormAct2d``: BN, then ``drop``,
    then ``act``) keeps that activation behind the frozen norm."""
    def convert(m):
        if not isinstance(m, _BN) or isinstance(m, (nn.BatchNorm1d, nn.BatchNorm3d)):
            return None
        frozen = FrozenBatchNorm2d.from_batchnorm(m)
        tail = [getattr(m, k) for k in ("drop", "act") if isinstance(getattr(m, k, None), nn.Module)]
        return nn.Sequential(frozen, *tail) if tail else frozen
    return _replace(module, convert)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm becomes ``torch.nn.SyncBatchNorm`` (statistics of the global batch).

    torch's SyncBatchNorm synchronizes only on GPU-like devices: on CPU with a process
    group of more than one rank its training forward raises (torch 2.13); single-process
    and evaluation forwards work anywhere."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def count_batchnorms(module: nn.Module) -> int:
    """Number of trainable-statistics BatchNorm layers (any ``_BatchNorm``, SyncBN included)."""
    return sum(isinstance(m, _BN) for m in module.modules())


def averaged_batchnorms(module: nn.Module) -> list[_BN]:
    """The BatchNorm layers whose running statistics differ between ranks: every
    ``_BatchNorm`` that tracks running statistics, except SyncBatchNorm (its statistics
    come from the global batch, so they are already equal) - frozen ones are no
    ``_BatchNorm``."""
    return [m for m in module.modules()
            if isinstance(m, _BN) and not isinstance(m, nn.SyncBatchNorm)
            and m.track_running_stats and m.running_mean is not None]


def average_batchnorm_statistics(module: nn.Module) -> int:
    """Replace every rank's BatchNorm running statistics by their mean over the ranks.

    Algorithm: the ``running_mean``, ``running_var`` and ``num_batches_tracked`` of every
    layer in :func:`averaged_batchnorms` are concatenated into ONE flat float64 tensor on
    the collective device, all-reduced (mean) through :mod:`agvm_ds.collectives`, and
    copied back (``num_batches_tracked`` rounded to the nearest integer). Returns the
    number of layers averaged; a no-op on one rank or without BatchNorm.

    The variance is averaged as is (mean of the ranks' running variances), the choice of
    detectron2's precise-BN / ``all_reduce`` of BN statistics: it estimates the
    per-rank-batch variance BatchNorm normalizes with in training. The variance of the
    union of the ranks' batches would add the spread of the ranks' means; it is not what
    any rank's training forward used, so it is not used here.

    float64 makes the mean exact to the buffers' precision and the step counters exact;
    the flat tensor holds only ``2C + 1`` numbers per layer. Nothing is read on the host.
    ZeRO-3 partitions parameters only - buffers stay whole on every rank - so this works
    in every ZeRO stage. Every rank must call it (it is a collective).
    """
    layers = averaged_batchnorms(module)
    if collectives.world() == 1 or not layers:
        return len(layers)
    device = collectives.device()
    parts = []
    for m in layers:
        parts += [m.running_mean.reshape(-1), m.running_var.reshape(-1)]
        if m.num_batches_tracked is not None:
            parts.append(m.num_batches_tracked.reshape(1))
    flat = torch.cat([p.detach().to(device=device, dtype=torch.float64) for p in parts])
    flat = collectives.all_reduce_mean(flat)
    offset = 0
    with torch.no_grad():
        for m in layers:
            for buf in (m.running_mean, m.running_var):
                n = buf.numel()
                buf.copy_(flat[offset:offset + n].view_as(buf))
                offset += n
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(flat[offset].round().view_as(m.num_batches_tracked))
                offset += 1
    return len(layers)
