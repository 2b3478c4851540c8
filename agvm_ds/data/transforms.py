"""Transforms detection users expect, and the batch collate function.

One :class:`Transform` does resize → (random) horizontal flip → to-tensor + normalize on an
``(PIL image, numpy target)`` pair, keeping boxes, instance masks and semantic maps in
step with the pixels. Randomness uses torch's generator so DataLoader workers (which torch
seeds per worker) are reproducible without extra plumbing.

Resize follows Detectron/mmdet's "shortest edge" rule: scale the short side to
``min_size`` unless that makes the long side exceed ``max_size``, in which case the long
side is scaled to ``max_size``. A sequence of ``min_size`` values means multi-scale
training: one is drawn per image.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255


def resized_shape(height: int, width: int, min_size: int, max_size: int | None) -> tuple[int, int, float]:
    """``(new_h, new_w, scale)`` for the shortest-edge rule (see module docstring)."""
    scale = min_size / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale))), scale


class Transform:
    """Resize / flip / normalize an image together with its target.

    Args:
        min_size: short-side length, a sequence to draw from per image, or None (no resize).
        max_size: cap on the long side after resizing (None: no cap).
        flip_prob: probability of a horizontal flip (use 0 for evaluation).
        mean, std: per-channel normalization of pixels scaled to [0, 1].
    """

    def __init__(self, min_size: int | Sequence[int] | None, max_size: int | None,
                 flip_prob: float = 0.0, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        sizes = [min_size] if isinstance(min_size, int) else list(min_size or [])
        if any(s <= 0 for s in sizes) or (max_size is not None and max_size <= 0):
            raise ValueError(f"Transform: sizes must be positive, got min_size={min_size}, "
                             f"max_size={max_size}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"Transform: flip_prob must be in [0, 1], got {flip_prob}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"Transform: mean/std need 3 values, std > 0; got {mean}, {std}")
        self.min_sizes, self.max_size, self.flip_prob = sizes, max_size, flip_prob
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image, target: dict) -> tuple[torch.Tensor, dict]:
        w0, h0 = image.size
        if self.min_sizes:
            pick = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))] \
                if len(self.min_sizes) > 1 else self.min_sizes[0]
            h, w, scale = resized_shape(h0, w0, pick, self.max_size)
        else:
            h, w, scale = h0, w0, 1.0
        if (h, w) != (h0, w0):
            image = image.resize((w, h), Image.BILINEAR)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        flip = self.flip_prob > 0 and float(torch.rand(())) < self.flip_prob
        out = {"image_id": target["image_id"], "orig_size": (h0, w0), "image_size": (h, w),
               "scale_factor": float(scale), "flipped": bool(flip)}
        if "boxes" in target:
            boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4).clone()
            boxes[:, 0::2] *= w / w0
            boxes[:, 1::2] *= h / h0
            if flip:
                boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
            out["boxes"] = boxes
            out["labels"] = torch.as_tensor(target["labels"], dtype=torch.int64)
        if "masks" in target:
            out["masks"] = _resize_nearest(torch.as_tensor(target["masks"]), h, w).to(torch.uint8)
        if "sem_seg" in target:
            out["sem_seg"] = _resize_nearest(torch.as_tensor(target["sem_seg"])[None], h, w)[0].long()
        if flip:
            pixels = pixels.flip(-1)
            for key in ("masks", "sem_seg"):
                if key in out:
                    out[key] = out[key].flip(-1)
        tensor = (pixels.float() / 255.0 - self.mean) / self.std
        return tensor.contiguous(), out


def _resize_nearest(stack: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Nearest-neighbour resize of an ``[n, H, W]`` integer stack (labels must not blend)."""
    if tuple(stack.shape[-2:]) == (h, w):
        return stack
    if stack.shape[0] == 0:
        return stack.new_zeros((0, h, w))
    # "nearest-exact" samples pixel centres, as PIL's bilinear resize of the image does.
    return F.interpolate(stack[None].float(), size=(h, w), mode="nearest-exact")[0].to(stack.dtype)


def collate(batch: list, size_divisibility: int = 32) -> tuple[torch.Tensor, list[dict]]:
    """Stack images into ``[B, 3, Hp, Wp]``, zero-padded to multiples of ``size_divisibility``.

    Padding goes right and bottom, so box and mask coordinates stay valid; targets are
    returned as a list (their sizes differ per image).
    """
    if not batch:
        raise ValueError("collate: empty batch")
    images, targets = zip(*batch)
    hp = max(im.shape[1] for im in images)
    wp = max(im.shape[2] for im in images)
    hp = int(math.ceil(hp / size_divisibility) * size_divisibility)
    wp = int(math.ceil(wp / size_divisibility) * size_divisibility)
    out = images[0].new_zeros((len(images), images[0].shape[0], hp, wp))
    for k, im in enumerate(images):
        out[k, :, : im.shape[1], : im.shape[2]] = im
    return out, list(targets)


def padded_size(image_size: Sequence[int], size_divisibility: int = 32) -> tuple[int, int]:
    """The ``(Hp, Wp)`` :func:`collate` gives an image of ``(h, w)`` in a batch of its own."""
    h, w = image_size
    return (int(math.ceil(h / size_divisibility) * size_divisibility),
            int(math.ceil(w / size_divisibility) * size_divisibility))


def unpad_groups(images: torch.Tensor, targets: list[dict],
                 size_divisibility: int = 32) -> list[tuple[list[int], torch.Tensor, list[dict]]]:
    """Split a collated batch into groups of images that :func:`collate` pads alike on their
    own: ``(indices into the batch, [n, 3, Hp, Wp] crop of the batch, their targets)``.

    Why: a network sees the padding (convolutions near the border, GroupNorm statistics,
    anchors over the padded area), so an image padded to a larger neighbour's size predicts
    differently than alone. Each group's crop is exactly the tensor the image would get in a
    batch of one, so results do not depend on the batch it was drawn in. Targets without
    ``image_size`` keep the batch whole.
    """
    if not all("image_size" in t for t in targets):
        return [(list(range(len(targets))), images, list(targets))]
    groups: dict[tuple[int, int], list[int]] = {}
    for k, t in enumerate(targets):
        groups.setdefault(padded_size(t["image_size"], size_divisibility), []).append(k)
    out = []
    for (hp, wp), idx in groups.items():
        crop = images[:, :, :hp, :wp]
        crop = crop if len(idx) == len(targets) else crop[idx]
        out.append((idx, crop.contiguous(), [targets[k] for k in idx]))
    return out
