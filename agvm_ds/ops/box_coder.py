"""Box <-> regression-target transform (R-CNN's ``dx, dy, dw, dh`` parameterization).

``encode(ref, gt)`` gives the deltas that turn reference boxes (anchors or proposals) into
the ground truth; ``decode`` inverts it. Centre offsets are relative to the reference size
and sizes are log-ratios, which makes the targets scale-invariant; ``weights`` rescale the
four components to roughly unit variance (10, 10, 5, 5 for Fast R-CNN heads). Exponents are
clamped at ``log(1000 / 16)`` so an untrained head cannot produce ``inf`` boxes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BoxCoder"]

_DEFAULT_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = _DEFAULT_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, ref: Tensor, gt: Tensor) -> Tensor:
        """Deltas ``[N, 4]`` taking ``ref [N, 4]`` to ``gt [N, 4]`` (both xyxy)."""
        ref, gt = ref.float(), gt.float()
        wx, wy, ww, wh = self.weights
        rw, rh = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
        rx, ry = ref[:, 0] + 0.5 * rw, ref[:, 1] + 0.5 * rh
        gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
        gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
        return torch.stack([wx * (gx - rx) / rw, wy * (gy - ry) / rh,
                            ww * torch.log(gw / rw), wh * torch.log(gh / rh)], dim=1)

    def decode(self, deltas: Tensor, ref: Tensor) -> Tensor:
        """Boxes from ``deltas [N, 4k]`` applied to ``ref [N, 4]`` -> ``[N, 4k]`` xyxy."""
        ref = ref.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        rw, rh = ref[:, 2:3] - ref[:, 0:1], ref[:, 3:4] - ref[:, 1:2]
        rx, ry = ref[:, 0:1] + 0.5 * rw, ref[:, 1:2] + 0.5 * rh
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        cx, cy = dx * rw + rx, dy * rh + ry
        w, h = torch.exp(dw) * rw, torch.exp(dh) * rh
        out = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=2)
        return out.reshape(deltas.shape)
