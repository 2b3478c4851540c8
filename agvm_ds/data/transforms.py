"""The per-image transform of the datasets, and the batch collate function.

One :class:`Transform` runs a list of augmentation steps (:mod:`agvm_ds.data.augment`) on an
``(PIL image, numpy target)`` pair, keeping boxes, instance masks and semantic maps in step
with the pixels, then converts to a normalized tensor. Without explicit steps it is what it
always was: resize → (random) horizontal flip → normalize. Randomness uses torch's
generator so DataLoader workers (which torch seeds per worker) are reproducible without
extra plumbing.

Resize follows Detectron/mmdet's "shortest edge" rule: scale the short side to
``min_size`` unless that makes the long side exceed ``max_size``, in which case the long
side is scaled to ``max_size``. A sequence of ``min_size`` values means multi-scale
training: one is drawn per image.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from PIL import Image

from agvm_ds.data.augment import Flip, Photometric, Resize, Sample, pixels_of, resized_shape

__all__ = ["IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "Transform", "collate", "padded_size",
           "resized_shape", "unpad_groups"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255


class Transform:
    """Augment / normalize an image together with its target.

    Args:
        min_size: short-side length, a sequence to draw from per image, or None (no resize).
        max_size: cap on the long side after resizing (None: no cap).
        flip_prob: probability of a horizontal flip (use 0 for evaluation).
        mean, std: per-channel normalization of pixels scaled to [0, 1].
        steps: the augmentation steps to run instead of resize + flip (then ``min_size``,
            ``max_size`` and ``flip_prob`` are not used); photometric steps come last.

    The target gets ``image_size`` (the augmented image, before any padding),
    ``scale_factor`` (product of the resize factors), ``orig_size`` and ``flipped``.
    """

    def __init__(self, min_size: int | Sequence[int] | None, max_size: int | None,
                 flip_prob: float = 0.0, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD,
                 steps: Sequence[Callable[[Sample], None]] | None = None):
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"Transform: mean/std need 3 values, std > 0; got {mean}, {std}")
        if steps is None:
            steps = [Resize(min_size, max_size), Flip(flip_prob)]
        colour = [isinstance(s, Photometric) for s in steps]
        if any(colour) and not all(colour[colour.index(True):]):
            raise ValueError("Transform: photometric steps must come after every geometric step")
        self.steps = list(steps)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @property
    def flip_prob(self) -> float:
        """The probability that this transform returns a flipped image."""
        p = 0.0
        for step in self.steps:
            if isinstance(step, Flip):
                p = p * (1 - step.prob) + (1 - p) * step.prob
        return p

    def __call__(self, image: Image.Image, target: dict) -> tuple[torch.Tensor, dict]:
        w0, h0 = image.size
        sample = Sample(image)
        if "boxes" in target:
            sample.boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4).clone()
            sample.labels = torch.as_tensor(target["labels"], dtype=torch.int64)
        if "masks" in target:
            sample.masks = torch.as_tensor(target["masks"]).to(torch.uint8)
        if "sem_seg" in target:
            sample.sem_seg = torch.as_tensor(target["sem_seg"]).long()
        for step in self.steps:
            step(sample)
        h, w = sample.size
        out = {"image_id": target["image_id"], "orig_size": (h0, w0), "image_size": (h, w),
               "scale_factor": float(sample.scale), "flipped": bool(sample.flipped)}
        for key in ("boxes", "labels", "masks", "sem_seg"):
            value = getattr(sample, key)
            if value is not None:
                out[key] = value
        pixels = sample.pixels if sample.pixels is not None else pixels_of(sample.image).float() / 255.0
        tensor = (pixels - self.mean) / self.std
        if sample.pad_to is not None and tuple(sample.pad_to) != (h, w):
            padded = tensor.new_zeros((3, max(h, sample.pad_to[0]), max(w, sample.pad_to[1])))
            padded[:, :h, :w] = tensor
            tensor = padded
        return tensor.contiguous(), out


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
