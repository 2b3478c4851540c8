"""RoIAlign (He et al., Mask R-CNN) in plain torch, with the exact semantics of torchvision's.

Each output bin averages ``sr_h x sr_w`` bilinear samples of the feature map. A sample whose
coordinate lies outside ``[-1, size]`` contributes 0; inside that range the coordinate is
clamped to ``[0, size - 1]`` before interpolating. The features are viewed as a channel-last
table ``[N*H*W, C]`` and every sample is four weighted row gathers, so all RoIs of all
images are pooled in one vectorized pass (no per-RoI Python loop), and the backward is an
``index_add`` into that table.

``sampling_ratio <= 0`` means "adaptive": ``ceil(roi_size / output_size)`` samples per bin,
different for each RoI; those RoIs are grouped by their sample counts (few distinct values
in practice) and each group is sampled in one call.

Precision and dtype, on both paths: the pooling is computed in fp32 (fp64 for fp64 input)
and returned in the input's dtype, with or without autocast. That is what torchvision's
kernel does under autocast (``roi_align(input.float(), rois.float()).to(input.dtype)``);
outside autocast its kernel would work in fp16 (and has no bf16), with sample coordinates
pixels off on a large image, so there we deliberately keep fp32 too.

Where torchvision's compiled ``roi_align`` runs (:mod:`agvm_ds.ops._dispatch`) it is used,
except on CUDA with ``torch.use_deterministic_algorithms(True)``: its backward adds with
atomics, so then (as torchvision itself does) the deterministic torch code runs.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import Tensor

from agvm_ds.ops import _dispatch

__all__ = ["roi_align", "boxes_to_rois", "RoIAlign"]


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """``[k_i, 4]`` boxes per image -> ``[sum k_i, 5]`` rows ``(batch_index, x1, y1, x2, y2)``."""
    rows = [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
    if not rows:
        return torch.zeros(0, 5)
    return torch.cat(rows, dim=0)


def _sample_grid(rois: Tensor, out_h: int, out_w: int, sr_h: int, sr_w: int,
                 scale: float, aligned: bool) -> tuple[Tensor, Tensor]:
    """Sample coordinates ``y [K, out_h * sr_h]`` and ``x [K, out_w * sr_w]`` in pixels."""
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * scale - offset
    y1 = rois[:, 2] * scale - offset
    roi_w = rois[:, 3] * scale - offset - x1
    roi_h = rois[:, 4] * scale - offset - y1
    if not aligned:  # legacy behaviour: RoIs are at least one pixel large
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / out_w, roi_h / out_h
    # fraction of a bin at which each sample sits: (bin index + (sample index + .5) / sr)
    fy = torch.arange(out_h, device=rois.device, dtype=rois.dtype).repeat_interleave(sr_h) \
        + (torch.arange(sr_h, device=rois.device, dtype=rois.dtype).repeat(out_h) + 0.5) / sr_h
    fx = torch.arange(out_w, device=rois.device, dtype=rois.dtype).repeat_interleave(sr_w) \
        + (torch.arange(sr_w, device=rois.device, dtype=rois.dtype).repeat(out_w) + 0.5) / sr_w
    return y1[:, None] + fy[None] * bin_h[:, None], x1[:, None] + fx[None] * bin_w[:, None]


def _axis_weights(coords: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Low/high neighbour indices and their weights along one axis, RoIAlign's border rules.

    Samples outside ``[-1, size]`` get weight 0; inside, the coordinate is clamped to
    ``[0, size - 1]`` and split between ``floor`` and ``floor + 1`` (capped at the edge).
    """
    valid = (coords >= -1) & (coords <= size)
    # NaN (a diverged box) is "outside" like in the kernel: weight 0 and a harmless index
    c = torch.where(valid, coords, 0).clamp(min=0, max=size - 1)
    low = c.floor()
    frac = c - low
    low = low.long()
    high = (low + 1).clamp(max=size - 1)
    v = valid.to(coords.dtype)
    return low, high, (1 - frac) * v, frac * v


def _align_group(flat: Tensor, h: int, w: int, rois: Tensor, out_h: int, out_w: int,
                 sr_h: int, sr_w: int, scale: float, aligned: bool) -> Tensor:
    """RoIAlign of RoIs sharing one sample count, from ``flat [N*H*W, C]`` features.

    Bilinear sampling as four row gathers of the channel-last feature table: every RoI of
    every image in one call, and a backward that is a plain ``index_add`` (much faster on
    CPU than ``grid_sample``'s backward).
    """
    k = rois.shape[0]
    ys, xs = _sample_grid(rois, out_h, out_w, sr_h, sr_w, scale, aligned)
    y0, y1, wy0, wy1 = _axis_weights(ys, h)  # [K, out_h * sr_h]
    x0, x1, wx0, wx1 = _axis_weights(xs, w)  # [K, out_w * sr_w]
    # [K, out, sr, 2 corners] per axis; then every (bin, sample, corner) combination, laid
    # out so each output bin's 4 * sr_h * sr_w contributions are contiguous rows
    yi = torch.stack([y0, y1], -1).view(k, out_h, 1, sr_h, 2, 1, 1)
    wy = torch.stack([wy0, wy1], -1).view(k, out_h, 1, sr_h, 2, 1, 1)
    xi = torch.stack([x0, x1], -1).view(k, 1, out_w, 1, 1, sr_w, 2)
    wx = torch.stack([wx0, wx1], -1).view(k, 1, out_w, 1, 1, sr_w, 2)
    base = (rois[:, 0].long() * (h * w)).view(k, 1, 1, 1, 1, 1, 1)
    idx = (base + yi * w + xi).reshape(-1)
    weight = (wy * wx).reshape(k * out_h * out_w, 1, -1) / (sr_h * sr_w)
    vals = flat.index_select(0, idx).view(weight.shape[0], weight.shape[2], flat.shape[1])
    out = torch.bmm(weight, vals)[:, 0]  # weighted sum per bin: [K * out_h * out_w, C]
    return out.view(k, out_h, out_w, -1).permute(0, 3, 1, 2)


def _no_autocast(device_type: str):
    """Autocast off inside (it would run the bmm below in half precision)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        pass
    return contextlib.nullcontext()


def _use_compiled(input: Tensor):
    if input.is_cuda and torch.are_deterministic_algorithms_enabled():
        return None  # the kernel's backward is atomics-based, ours is deterministic
    return _dispatch.compiled_op("roi_align", input.device)


def roi_align(input: Tensor, rois: Tensor | Sequence[Tensor], output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Pool ``rois`` from ``input [N, C, H, W]`` into ``[K, C, out_h, out_w]``, ``input``'s dtype.

    ``rois`` is ``[K, 5]`` (batch index, x1, y1, x2, y2) in input-image pixels or a list of
    per-image ``[k_i, 4]`` boxes; ``spatial_scale`` maps them to the feature map
    (1 / stride). ``aligned=True`` shifts by half a pixel so a box maps onto the pixels it
    covers (detectron2's ROIAlignV2); ``aligned=False`` reproduces the original op.
    Gradients flow to ``input`` only.
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    out_h, out_w = int(out_h), int(out_w)
    if not isinstance(rois, Tensor):
        rois = boxes_to_rois(list(rois)).to(input.device)
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"roi_align: rois must be [K, 5], got {tuple(rois.shape)}")
    n, c = input.shape[:2]
    if rois.shape[0] == 0:
        return input.new_zeros(0, c, out_h, out_w)
    cdtype = torch.promote_types(input.dtype, torch.float32)
    rois = rois.detach().to(device=input.device, dtype=cdtype)
    op = _use_compiled(input)
    if op is not None:
        out = op(input.to(cdtype), rois.contiguous(), float(spatial_scale), out_h, out_w,
                 int(sampling_ratio), bool(aligned))
        return out.to(input.dtype)
    with _no_autocast(input.device.type):
        return _roi_align_torch(input, rois, out_h, out_w, float(spatial_scale),
                                int(sampling_ratio), bool(aligned), cdtype).to(input.dtype)


def _roi_align_torch(input: Tensor, rois: Tensor, out_h: int, out_w: int, spatial_scale: float,
                     sampling_ratio: int, aligned: bool, cdtype: torch.dtype) -> Tensor:
    """The pure-torch pooling, in ``cdtype``; ``rois`` are already ``cdtype`` and detached."""
    n, c, h, w = input.shape
    flat = input.to(cdtype).permute(0, 2, 3, 1).reshape(n * h * w, c)
    if sampling_ratio > 0:
        return _align_group(flat, h, w, rois, out_h, out_w, sampling_ratio, sampling_ratio,
                            spatial_scale, aligned)
    out = flat.new_zeros(rois.shape[0], c, out_h, out_w)
    # sample counts from the RoI size computed exactly as the kernel does (end - start of the
    # scaled, shifted corners): ceil() is discontinuous, so a differently rounded size could
    # pick a different count
    offset = 0.5 if aligned else 0.0
    rw = (rois[:, 3] * spatial_scale - offset) - (rois[:, 1] * spatial_scale - offset)
    rh = (rois[:, 4] * spatial_scale - offset) - (rois[:, 2] * spatial_scale - offset)
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    sr_w = torch.ceil(rw / out_w).nan_to_num(0.0).long()
    sr_h = torch.ceil(rh / out_h).nan_to_num(0.0).long()
    key = sr_h * 1_000_003 + sr_w
    for value in torch.unique(key).tolist():
        sel = torch.nonzero(key == value).squeeze(1)
        gh, gw = int(sr_h[sel[0]]), int(sr_w[sel[0]])
        if gh <= 0 or gw <= 0:  # empty RoI under adaptive sampling: torchvision returns 0
            continue
        pooled = _align_group(flat, h, w, rois[sel], out_h, out_w, gh, gw, spatial_scale, aligned)
        out = out.index_copy(0, sel, pooled)
    return out


class RoIAlign(torch.nn.Module):
    """Module form of :func:`roi_align` (no parameters)."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int = 0,
                 aligned: bool = True):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale,
                         self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")
