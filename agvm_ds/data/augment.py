"""The augmentation steps of ``data.transforms``, each a small class acting on a :class:`Sample`.

A :class:`Sample` carries one image with everything that must move with its pixels (boxes,
labels, instance masks, a semantic map) and the bookkeeping evaluation reads (the resize
scale, whether it is flipped). Geometric steps keep the image a PIL image (the resize is
PIL's bilinear one, as it always was); the first photometric step turns it into float
pixels in [0, 1], which is why photometric steps come last (:mod:`agvm_ds.config.augment`).

Randomness comes from torch's global generator, which training seeds per sample from
(seed, epoch, dataset index) (:class:`agvm_ds.train.sampler.SeededDataset`), so a draw
never depends on the rank, the world size or the loader worker. Each step draws the same
number of values whatever the image, so one step's draw never shifts another's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# torchvision's (ITU-R 601-2 luma) weights for the grey image contrast/saturation blend with
GREY_WEIGHTS = (0.2989, 0.587, 0.114)


def resized_shape(height: int, width: int, min_size: int, max_size: int | None) -> tuple[int, int, float]:
    """``(new_h, new_w, scale)`` for the shortest-edge rule: scale the short side to
    ``min_size`` unless the long side would exceed ``max_size``, then scale that to it."""
    scale = min_size / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale))), scale


def resize_nearest(stack: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Nearest-neighbour resize of an ``[n, H, W]`` integer stack (labels must not blend)."""
    if tuple(stack.shape[-2:]) == (h, w):
        return stack
    if stack.shape[0] == 0:
        return stack.new_zeros((0, h, w))
    # "nearest-exact" samples pixel centres, as PIL's bilinear resize of the image does.
    return F.interpolate(stack[None].float(), size=(h, w), mode="nearest-exact")[0].to(stack.dtype)


def uniform(lo: float, hi: float) -> float:
    """One draw from [lo, hi) with torch's global generator (always exactly one draw)."""
    return lo + (hi - lo) * float(torch.rand(()))


@dataclass
class Sample:
    """One image and its targets in the current (augmented) geometry."""

    image: Image.Image
    boxes: torch.Tensor | None = None      # float32 [N, 4] xyxy in the current image
    labels: torch.Tensor | None = None     # int64 [N]
    masks: torch.Tensor | None = None      # uint8 [N, H, W]
    sem_seg: torch.Tensor | None = None    # int64 [H, W]
    scale: float = 1.0                     # product of the resize factors (target scale_factor)
    flipped: bool = False
    pixels: torch.Tensor | None = None     # float [3, H, W] in [0, 1], once colour steps ran
    pad_to: tuple[int, int] | None = None  # pad the final tensor (right/bottom) to this size

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the image now."""
        if self.pixels is not None:
            return tuple(self.pixels.shape[-2:])
        return self.image.size[1], self.image.size[0]

    def resize(self, h: int, w: int, scale: float) -> None:
        h0, w0 = self.size
        if (h, w) != (h0, w0):
            self.image = self.image.resize((w, h), Image.BILINEAR)
        if self.boxes is not None:
            self.boxes[:, 0::2] *= w / w0
            self.boxes[:, 1::2] *= h / h0
        if self.masks is not None:
            self.masks = resize_nearest(self.masks, h, w).to(torch.uint8)
        if self.sem_seg is not None:
            self.sem_seg = resize_nearest(self.sem_seg[None], h, w)[0].long()
        self.scale *= scale

    def hflip(self) -> None:
        w = self.size[1]
        self.image = self.image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.boxes is not None:
            self.boxes[:, [0, 2]] = w - self.boxes[:, [2, 0]]
        if self.masks is not None:
            self.masks = self.masks.flip(-1)
        if self.sem_seg is not None:
            self.sem_seg = self.sem_seg.flip(-1)
        self.flipped = not self.flipped

    def crop(self, y0: int, x0: int, ch: int, cw: int, min_area: float) -> None:
        """Keep rows ``y0 : y0+ch`` and columns ``x0 : x0+cw`` (inside the image); clip boxes
        and drop instances left with a box area under ``min_area`` or an empty mask."""
        self.image = self.image.crop((x0, y0, x0 + cw, y0 + ch))
        if self.masks is not None:
            self.masks = self.masks[:, y0:y0 + ch, x0:x0 + cw]
        if self.sem_seg is not None:
            self.sem_seg = self.sem_seg[y0:y0 + ch, x0:x0 + cw]
        if self.boxes is None:
            return
        boxes = self.boxes - torch.tensor([x0, y0, x0, y0], dtype=self.boxes.dtype)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = (bw > 0) & (bh > 0) & (bw * bh >= min_area)
        if self.masks is not None:
            keep &= self.masks.flatten(1).amax(1) > 0
        self.boxes, self.labels = boxes[keep], self.labels[keep]
        if self.masks is not None:
            self.masks = self.masks[keep]


class Resize:
    """Shortest-edge resize; a list of short sides draws one per image."""

    def __init__(self, min_size: int | Sequence[int] | None, max_size: int | None):
        self.min_sizes = [min_size] if isinstance(min_size, int) else list(min_size or [])
        self.max_size = max_size
        if any(s <= 0 for s in self.min_sizes) or (max_size is not None and max_size <= 0):
            raise ValueError(f"resize: sizes must be positive, got min_size={min_size}, "
                             f"max_size={max_size}")

    def __call__(self, sample: Sample) -> None:
        if not self.min_sizes:
            return
        pick = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))] \
            if len(self.min_sizes) > 1 else self.min_sizes[0]
        h, w, scale = resized_shape(*sample.size, pick, self.max_size)
        sample.resize(h, w, scale)


class Flip:
    """Horizontal flip with probability ``prob`` (no draw at all when ``prob`` is 0)."""

    def __init__(self, prob: float):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"flip: prob must be in [0, 1], got {prob}")
        self.prob = prob

    def __call__(self, sample: Sample) -> None:
        if self.prob > 0 and float(torch.rand(())) < self.prob:
            sample.hflip()


class RandomCrop:
    """A crop of ``size`` pixels or ``relative`` fractions (at most the image) at a uniformly
    drawn offset."""

    def __init__(self, size: tuple[int, int] | None = None,
                 relative: tuple[float, float] | None = None, min_area: float = 1.0):
        if (size is None) == (relative is None):
            raise ValueError("random_crop: give exactly one of size or relative")
        self.size, self.relative, self.min_area = size, relative, min_area

    def crop_size(self, h: int, w: int) -> tuple[int, int]:
        if self.size is not None:
            return min(self.size[0], h), min(self.size[1], w)
        return (max(1, min(h, int(round(self.relative[0] * h)))),
                max(1, min(w, int(round(self.relative[1] * w)))))

    def __call__(self, sample: Sample) -> None:
        h, w = sample.size
        ch, cw = self.crop_size(h, w)
        y0 = int(torch.randint(h - ch + 1, ()))
        x0 = int(torch.randint(w - cw + 1, ()))
        sample.crop(y0, x0, ch, cw, self.min_area)


class LargeScaleJitter:
    """Resize so the image fits ``scale × size`` (aspect kept, ``scale`` uniform in
    [min_scale, max_scale]), crop a random ``size`` window from it, and (``pad``) pad the
    result to ``size``, as detectron2's ResizeScale + FixedSizeCrop (Ghiasi et al.'s
    copy-paste recipe) do. The padding is the mean colour (0 after normalization), exactly
    what the batch collate adds, and ``image_size`` stays the unpadded content."""

    def __init__(self, size: tuple[int, int], min_scale: float, max_scale: float,
                 pad: bool = True, min_area: float = 1.0):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"large_scale_jitter: need 0 < min_scale <= max_scale, got "
                             f"{min_scale}, {max_scale}")
        self.size, self.min_scale, self.max_scale = tuple(size), min_scale, max_scale
        self.pad, self.min_area = pad, min_area

    def __call__(self, sample: Sample) -> None:
        th, tw = self.size
        h0, w0 = sample.size
        jitter = uniform(self.min_scale, self.max_scale)
        scale = min(jitter * th / h0, jitter * tw / w0)
        h, w = max(1, int(round(h0 * scale))), max(1, int(round(w0 * scale)))
        sample.resize(h, w, scale)
        ch, cw = min(th, h), min(tw, w)
        y0 = int(torch.randint(h - ch + 1, ()))
        x0 = int(torch.randint(w - cw + 1, ()))
        sample.crop(y0, x0, ch, cw, self.min_area)
        if self.pad:
            sample.pad_to = (th, tw)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` RGB in [0, 1] → HSV in [0, 1] (hue in turns), colorsys's convention."""
    r, g, b = x[0], x[1], x[2]
    maxc, minc = x.max(0).values, x.min(0).values
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, torch.remainder(h / 6.0, 1.0), torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = x[0], x[1], x[2]
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = torch.remainder(i, 6).long()
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # the (r, g, b) of each of the six hue sectors
    table = torch.stack([torch.stack(c) for c in ((v, t, p), (q, v, p), (p, v, t),
                                                    (p, q, v), (t, p, v), (v, p, q))])
    return table.gather(0, i[None, None].expand(1, 3, *i.shape))[0]


class Photometric:
    """Brightness, contrast, saturation and hue jitter on float pixels in [0, 1] (each
    result clamped to [0, 1]); the four factors are drawn in that order for every image."""

    def __init__(self, brightness=(1.0, 1.0), contrast=(1.0, 1.0), saturation=(1.0, 1.0),
                 hue=(0.0, 0.0)):
        self.brightness, self.contrast = tuple(brightness), tuple(contrast)
        self.saturation, self.hue = tuple(saturation), tuple(hue)

    def __call__(self, sample: Sample) -> None:
        fb, fc = uniform(*self.brightness), uniform(*self.contrast)
        fs, fh = uniform(*self.saturation), uniform(*self.hue)
        if sample.pixels is None:
            sample.pixels = pixels_of(sample.image).float() / 255.0
        sample.pixels = self.apply(sample.pixels, fb, fc, fs, fh)

    @staticmethod
    def apply(x: torch.Tensor, brightness: float, contrast: float, saturation: float,
              hue: float) -> torch.Tensor:
        weights = torch.tensor(GREY_WEIGHTS, dtype=x.dtype).view(3, 1, 1)
        if brightness != 1.0:
            x = (x * brightness).clamp(0, 1)
        if contrast != 1.0:
            mean = (x * weights).sum(0).mean()
            x = (contrast * x + (1 - contrast) * mean).clamp(0, 1)
        if saturation != 1.0:
            grey = (x * weights).sum(0, keepdim=True)
            x = (saturation * x + (1 - saturation) * grey).clamp(0, 1)
        if hue != 0.0:
            hsv = rgb_to_hsv(x)
            hsv[0] = torch.remainder(hsv[0] + hue, 1.0)
            x = hsv_to_rgb(hsv).clamp(0, 1)
        return x


def pixels_of(image: Image.Image) -> torch.Tensor:
    """uint8 ``[3, H, W]`` of an RGB PIL image."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


STEP_CLASSES = {"resize": Resize, "flip": Flip, "random_crop": RandomCrop,
                "large_scale_jitter": LargeScaleJitter, "photometric": Photometric}


def build_step(cfg, default_min_size=None, default_max_size=None):
    """The step object of one validated ``data.transforms`` entry
    (:mod:`agvm_ds.config.augment`); a resize step's null sizes fall back to the defaults."""
    fields = {k: v for k, v in dict(cfg).items() if k != "type"}
    if cfg.type == "resize":
        fields["min_size"] = default_min_size if fields["min_size"] is None else fields["min_size"]
        fields["max_size"] = default_max_size if fields["max_size"] is None else fields["max_size"]
    return STEP_CLASSES[cfg.type](**fields)
