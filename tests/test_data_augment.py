"""data.transforms (issue 32 item 4): each augmentation step against a naive per-pixel
reference, the default pipeline against the code it replaced, and the draws' determinism.

Geometry references: every box is rendered as a mask (integer box → exact pixel set), the
transform is replayed pixel by pixel with plain Python loops (where each output pixel comes
from), and the step's boxes must be the bounding box of that mask within 1 px while its
masks equal the replayed ones exactly. Crop offsets are not re-drawn by the tests: they are
found by searching for the window of the input whose pixels the output holds.
"""

from __future__ import annotations

import colorsys
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from agvm_ds.config.base import parse_section
from agvm_ds.config.data import DataConfig
from agvm_ds.data.augment import (Flip, LargeScaleJitter, Photometric, RandomCrop, Resize,
                                  Sample, build_step)
from agvm_ds.data.build import build_transform
from agvm_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Transform, collate
from agvm_ds.errors import ConfigError
from agvm_ds.train.sampler import SeededDataset, StepBatchSampler, StepSampler

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def previous_transform(image, target, min_sizes, max_size, flip_prob):
    """The resize + flip pipeline as it was before data.transforms (commit 91de520)."""
    w0, h0 = image.size
    if min_sizes:
        pick = min_sizes[int(torch.randint(len(min_sizes), ()))] if len(min_sizes) > 1 else min_sizes[0]
        scale = pick / min(h0, w0)
        if max_size is not None and max(h0, w0) * scale > max_size:
            scale = max_size / max(h0, w0)
        h, w = max(1, int(round(h0 * scale))), max(1, int(round(w0 * scale)))
    else:
        h, w, scale = h0, w0, 1.0
    if (h, w) != (h0, w0):
        image = image.resize((w, h), Image.BILINEAR)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    flip = flip_prob > 0 and float(torch.rand(())) < flip_prob
    out = {"image_id": target["image_id"], "orig_size": (h0, w0), "image_size": (h, w),
           "scale_factor": float(scale), "flipped": bool(flip)}

    def nearest(stack):
        if tuple(stack.shape[-2:]) == (h, w):
            return stack
        if stack.shape[0] == 0:
            return stack.new_zeros((0, h, w))
        return F.interpolate(stack[None].float(), size=(h, w), mode="nearest-exact")[0].to(stack.dtype)

    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4).clone()
    boxes[:, 0::2] *= w / w0
    boxes[:, 1::2] *= h / h0
    if flip:
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    out["boxes"], out["labels"] = boxes, torch.as_tensor(target["labels"], dtype=torch.int64)
    out["masks"] = nearest(torch.as_tensor(target["masks"])).to(torch.uint8)
    out["sem_seg"] = nearest(torch.as_tensor(target["sem_seg"])[None])[0].long()
    if flip:
        pixels = pixels.flip(-1)
        out["masks"], out["sem_seg"] = out["masks"].flip(-1), out["sem_seg"].flip(-1)
    return ((pixels.float() / 255.0 - MEAN) / STD).contiguous(), out


def random_sample(rng, h, w, n, index=0):
    """A noise image (every window is unique) with ``n`` integer boxes drawn as masks."""
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    x0, y0 = rng.integers(0, w - 2, n), rng.integers(0, h - 2, n)
    x1 = np.minimum(w, x0 + rng.integers(1, w // 2 + 2, n))
    y1 = np.minimum(h, y0 + rng.integers(1, h // 2 + 2, n))
    boxes = np.stack([x0, y0, x1, y1], 1).astype(np.float32).reshape(-1, 4)
    masks = np.zeros((n, h, w), np.uint8)
    for k, (a, b, c, d) in enumerate(boxes.astype(int)):
        masks[k, b:d, a:c] = 1
    return image, {"image_id": index, "boxes": boxes, "labels": np.arange(n), "masks": masks,
                   "sem_seg": rng.integers(0, 5, (h, w)).astype(np.int64)}


def assert_same(a, b):
    (ia, ta), (ib, tb) = a, b
    assert torch.equal(ia, ib) and ta.keys() == tb.keys()
    for key, va in ta.items():
        vb = tb[key]
        assert (torch.equal(va, vb) and va.dtype == vb.dtype) if torch.is_tensor(va) else \
            (va == vb and type(va) is type(vb)), key


@pytest.mark.parametrize("min_size, max_size, flip_prob", [([24, 32, 40], 60, 0.5), (32, None, 1.0),
                                                           (None, None, 0.0), (28, 30, 0.5)])
def test_default_pipeline_reproduces_the_previous_one(min_size, max_size, flip_prob):
    rng = np.random.default_rng(5)
    sizes = [min_size] if isinstance(min_size, int) else list(min_size or [])
    flips = 0
    for k in range(8):
        image, target = random_sample(rng, int(rng.integers(20, 70)), int(rng.integers(20, 70)), k % 4, k)
        torch.manual_seed(k)
        new = Transform(min_size, max_size, flip_prob)(image, dict(target))
        after_new = torch.rand(4)
        torch.manual_seed(k)
        old = previous_transform(image, dict(target), sizes, max_size, flip_prob)
        assert_same(new, old)
        assert torch.equal(after_new, torch.rand(4))  # the same number of draws, too
        flips += new[1]["flipped"]
    assert (flips == 0) == (flip_prob == 0.0)


def bbox_of(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def find_window(big: np.ndarray, small: np.ndarray) -> tuple[int, int]:
    """The one offset (y, x) where ``small`` [h, w, 3] sits inside ``big`` (naive search)."""
    h, w = small.shape[:2]
    hits = [(y, x) for y in range(big.shape[0] - h + 1) for x in range(big.shape[1] - w + 1)
            if np.array_equal(big[y:y + h, x:x + w], small)]
    assert len(hits) == 1, hits
    return hits[0]


def check_against_masks(out_target, ref_masks, kept):
    """Boxes = bbox of the reference masks within 1 px; masks equal; the empty ones dropped."""
    assert out_target["labels"].tolist() == kept
    h, w = ref_masks[0].shape
    expected = np.stack([ref_masks[k] for k in kept]) if kept else np.zeros((0, h, w), np.uint8)
    assert torch.equal(out_target["masks"], torch.from_numpy(expected))
    for box, k in zip(out_target["boxes"].tolist(), kept):
        assert np.allclose(box, bbox_of(ref_masks[k]), atol=1.0), (box, bbox_of(ref_masks[k]))


def content_pixels(tensor, h, w):
    return torch.round((tensor[:, :h, :w] * STD + MEAN) * 255).to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("crop", [RandomCrop(size=(18, 25)), RandomCrop(relative=(0.5, 0.7)),
                                  RandomCrop(size=(80, 80))])
def test_random_crop_against_a_per_pixel_replay(crop):
    rng = np.random.default_rng(1)
    dropped = 0
    for k in range(6):
        image, target = random_sample(rng, 30, 40, 5, k)
        torch.manual_seed(100 + k)
        tensor, out = Transform(None, None, steps=[crop, Flip(0.5)])(image, dict(target))
        h, w = out["image_size"]
        assert (h, w) == crop.crop_size(30, 40) and tensor.shape[-2:] == (h, w)
        pixels = content_pixels(tensor, h, w)
        if out["flipped"]:
            pixels = pixels[:, ::-1]
        y0, x0 = find_window(np.array(image), pixels)
        ref = []
        for m in target["masks"]:  # naive: output pixel (i, j) holds input (y0 + i, x0 + j), mirrored
            r = np.zeros((h, w), np.uint8)
            for i in range(h):
                for j in range(w):
                    r[i, j] = m[y0 + i, x0 + (w - 1 - j if out["flipped"] else j)]
            ref.append(r)
        kept = [k for k in range(len(ref)) if ref[k].any()]
        dropped += len(ref) - len(kept)
        check_against_masks(out, ref, kept)
        sem = target["sem_seg"][y0:y0 + h, x0:x0 + w]
        assert torch.equal(out["sem_seg"], torch.from_numpy(np.ascontiguousarray(
            sem[:, ::-1] if out["flipped"] else sem)))
        # detection targets (no masks): the box rule alone drops the same instances
        boxes_only = {key: v for key, v in target.items() if key != "masks"}
        torch.manual_seed(100 + k)
        _, det = Transform(None, None, steps=[crop, Flip(0.5)])(image, boxes_only)
        assert det["labels"].tolist() == kept and torch.equal(det["boxes"], out["boxes"])
    assert dropped > 0 or crop.size == (80, 80)  # the small crops did drop instances


def test_crop_drops_an_instance_whose_mask_leaves_the_window_though_its_box_stays():
    masks = torch.zeros((2, 20, 20), dtype=torch.uint8)
    masks[0, 15:, 15:] = 1  # box [0, 0, 20, 20] (an L-shaped object's corner), mask off-window
    masks[0, 0, 0] = 1
    masks[1, 2:6, 2:6] = 1
    sample = Sample(Image.new("RGB", (20, 20)), boxes=torch.tensor([[1.0, 1, 20, 20], [2, 2, 6, 6]]),
                    labels=torch.tensor([0, 1]), masks=masks)
    sample.crop(2, 2, 10, 10, min_area=1.0)
    assert sample.labels.tolist() == [1] and sample.masks.shape == (1, 10, 10)
    assert sample.boxes.tolist() == [[0.0, 0.0, 4.0, 4.0]] and sample.masks[0, :4, :4].all()


def test_large_scale_jitter_against_a_per_pixel_replay():
    rng = np.random.default_rng(2)
    lsj = LargeScaleJitter((24, 32), min_scale=0.5, max_scale=2.0)
    seen_scales, dropped = [], 0
    for k in range(8):
        h0, w0 = int(rng.integers(20, 40)), int(rng.integers(20, 40))
        image, target = random_sample(rng, h0, w0, 4, k)
        torch.manual_seed(200 + k)
        tensor, out = Transform(None, None, steps=[lsj])(image, dict(target))
        assert tensor.shape == (3, 24, 32)  # padded to the target size
        scale = out["scale_factor"]
        base = min(24 / h0, 32 / w0)
        assert 0.5 * base - 1e-9 <= scale <= 2.0 * base + 1e-9
        seen_scales.append(scale / base)
        h, w = max(1, round(h0 * scale)), max(1, round(w0 * scale))
        ch, cw = out["image_size"]
        assert (ch, cw) == (min(24, h), min(32, w))
        assert torch.all(tensor[:, ch:, :] == 0) and torch.all(tensor[:, :, cw:] == 0)
        resized = np.array(image.resize((w, h), Image.BILINEAR))
        y0, x0 = find_window(resized, content_pixels(tensor, ch, cw))
        ref = []
        for m in target["masks"]:  # naive nearest-exact: pixel centres mapped back, floored
            r = np.zeros((ch, cw), np.uint8)
            for i in range(ch):
                for j in range(cw):
                    r[i, j] = m[min(h0 - 1, math.floor((y0 + i + 0.5) * h0 / h)),
                                min(w0 - 1, math.floor((x0 + j + 0.5) * w0 / w))]
            ref.append(r)
        kept = [k for k in range(len(ref)) if ref[k].any()]
        dropped += len(ref) - len(kept)
        check_against_masks(out, ref, kept)
        sem = target["sem_seg"]
        assert out["sem_seg"].tolist() == [[sem[min(h0 - 1, math.floor((y0 + i + 0.5) * h0 / h)),
                                                 min(w0 - 1, math.floor((x0 + j + 0.5) * w0 / w))]
                                             for j in range(cw)] for i in range(ch)]
    assert max(seen_scales) > 1.2 and min(seen_scales) < 0.9  # the draw spans the range
    assert dropped > 0  # some crops cut instances away


@pytest.mark.parametrize("factors", [(1.3, 1.0, 1.0, 0.0), (1.0, 0.6, 1.0, 0.0), (1.0, 1.0, 0.3, 0.0),
                                     (1.0, 1.0, 1.0, 0.21), (0.8, 1.4, 1.7, -0.33)])
def test_photometric_against_colorsys(factors):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    image[0, 0] = image[0, 1] = (90, 90, 90)  # grey pixels: hue undefined, must stay grey
    fb, fc, fs, fh = factors
    step = Photometric(brightness=(fb, fb), contrast=(fc, fc), saturation=(fs, fs), hue=(fh, fh))
    tensor, _ = Transform(None, None, steps=[step])(Image.fromarray(image), {"image_id": 0})
    got = (tensor * STD + MEAN).double()
    x = image.astype(np.float64) / 255.0
    grey = lambda p: 0.2989 * p[0] + 0.587 * p[1] + 0.114 * p[2]  # noqa: E731
    clip = lambda v: min(1.0, max(0.0, v))  # noqa: E731
    h, w = x.shape[:2]
    x = [[[clip(c * fb) for c in x[i, j]] for j in range(w)] for i in range(h)]
    mean = sum(grey(x[i][j]) for i in range(h) for j in range(w)) / (h * w)
    x = [[[clip(fc * c + (1 - fc) * mean) for c in x[i][j]] for j in range(w)] for i in range(h)]
    x = [[[clip(fs * c + (1 - fs) * grey(x[i][j])) for c in x[i][j]] for j in range(w)] for i in range(h)]
    for i in range(h):
        for j in range(w):
            hh, ss, vv = colorsys.rgb_to_hsv(*x[i][j])
            x[i][j] = colorsys.hsv_to_rgb((hh + fh) % 1.0, ss, vv)
    ref = torch.tensor(x, dtype=torch.float64).permute(2, 0, 1)
    assert torch.allclose(got, ref, atol=2e-5), (got - ref).abs().max()


class Repeated(torch.utils.data.Dataset):
    """Same image at every index, so any difference between indices is the draw's."""

    def __init__(self, transform, n=16):
        self.image, self.target = random_sample(np.random.default_rng(4), 36, 44, 4)
        self.transform, self.n = transform, n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return self.transform(self.image, {**self.target, "image_id": index})


def full_pipeline():
    steps = [{"type": "large_scale_jitter", "size": 32, "min_scale": 0.3, "max_scale": 2.0},
             {"type": "random_crop", "relative": 0.8}, {"type": "flip", "prob": 0.5},
             {"type": "photometric", "brightness": [0.7, 1.3], "contrast": [0.7, 1.3],
              "saturation": [0.5, 1.5], "hue": [-0.1, 0.1]}]
    cfg = parse_section(DataConfig, {"transforms": steps}, "data")
    return cfg, build_transform(cfg, train=True)


def test_draws_follow_seed_and_index_not_the_world_size():
    cfg, transform = full_pipeline()
    ds = SeededDataset(Repeated(transform))
    a, b = ds[(3, 11)], ds[(3, 11)]
    assert_same(a, b)  # same (index, seed) → same sample
    c = ds[(4, 12)]
    assert not torch.equal(a[0], c[0])  # another sample's seed → another draw
    blocks = {}
    for world, gas in ((1, 4), (2, 2)):
        for rank in range(world):
            sampler = StepSampler(16, world, rank, micro_batch=2, grad_accum=gas, seed=7)
            loader = torch.utils.data.DataLoader(ds, batch_sampler=StepBatchSampler(sampler, 0, 3),
                                                 collate_fn=collate, num_workers=rank)
            for n, (images, targets) in enumerate(loader):
                step, m = divmod(n, gas)
                key = (step, sampler.block(m))
                got = (images, [t["boxes"] for t in targets], [t["masks"] for t in targets])
                if key in blocks:
                    ref = blocks[key]
                    assert torch.equal(ref[0], got[0]), key
                    assert all(torch.equal(x, y) for x, y in zip(ref[1] + ref[2], got[1] + got[2]))
                else:
                    blocks[key] = got
    assert len(blocks) == 12  # 3 steps x 4 blocks, each seen at both world sizes


def test_config_builds_training_steps_and_evaluation_ignores_them():
    cfg, train = full_pipeline()
    assert [type(s) for s in train.steps] == [LargeScaleJitter, RandomCrop, Flip, Photometric]
    val = build_transform(cfg, train=False)
    assert [type(s) for s in val.steps] == [Resize, Flip] and val.flip_prob == 0.0
    assert val.steps[0].min_sizes == [cfg.eval_min_size]
    resize = build_step(parse_section(DataConfig, {"min_size": [40, 50], "max_size": 90,
                                                   "transforms": [{"type": "resize"}]}, "data").transforms[0],
                        [40, 50], 90)
    assert resize.min_sizes == [40, 50] and resize.max_size == 90


@pytest.mark.parametrize("steps, flips", [([{"type": "random_crop", "size": [8, 9]}], 0.0),
                                          ([{"type": "flip", "prob": 0.3}], 0.3), (None, 0.5)])
def test_the_recorded_config_reads_back_the_same(steps, flips):
    # config.json writes every field (flip_prob too): reading it back must give the same section
    cfg = parse_section(DataConfig, {"transforms": steps} if steps else {}, "data")
    assert cfg.flip_prob == flips == build_transform(cfg, train=True).flip_prob
    again = parse_section(DataConfig, json.loads(json.dumps(cfg.model_dump(mode="json"))), "data")
    assert again == cfg


@pytest.mark.parametrize("steps, extra, needle", [
    ([{"type": "jitter"}], {}, "does not match any of the expected tags"),
    ([{"type": "random_crop", "size": 8, "relative": 0.5}], {}, "exactly one of size"),
    ([{"type": "random_crop", "size": 8, "min_aera": 2}], {},
     "transforms.0.random_crop.min_aera: unknown key (did you mean 'min_area'?)"),
    ([{"type": "large_scale_jitter", "size": 64, "min_scale": 2, "max_scale": 1}], {}, "min_scale"),
    ([{"type": "photometric", "hue": [0, 0.7]}], {}, "hue"),
    ([{"type": "photometric"}, {"type": "flip"}], {}, "after a 'photometric' step"),
    ([{"type": "flip", "prob": 0.3}], {"flip_prob": 0.5}, "flip_prob (0.5) disagrees"),
])
def test_bad_steps_are_refused_in_one_line(steps, extra, needle):
    with pytest.raises(ConfigError) as err:
        parse_section(DataConfig, {"transforms": steps, **extra}, "data")
    assert needle in str(err.value) and "data" in str(err.value) and "\n" not in str(err.value)
    # agreeing keys are fine: a _base_ file's flip_prob next to a flip step of the same prob
    parse_section(DataConfig, {"transforms": [{"type": "flip", "prob": 0.5}], "flip_prob": 0.5}, "data")
