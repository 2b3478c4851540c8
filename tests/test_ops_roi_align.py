"""RoIAlign against a naive float64 bilinear-sampling reference (and torchvision's Python one)."""

import math
import sys

import pytest
import torch

import agvm_ds  # noqa: F401  (torchvision compat)
from agvm_ds.ops import mask_targets, paste_masks, roi_align


def _bilinear(img, y, x):
    """Value of ``img [H, W]`` at real (y, x) with RoIAlign's border rules, plain python."""
    h, w = len(img), len(img[0])
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * img[y0][x0] + (1 - ly) * lx * img[y0][x1]
            + ly * (1 - lx) * img[y1][x0] + ly * lx * img[y1][x1])


def _reference(feat, rois, out, scale, ratio, aligned):
    """Loop over RoIs, channels, bins and samples; everything float64."""
    feat = feat.double().tolist()
    res = torch.zeros(len(rois), len(feat[0]), out, out, dtype=torch.float64)
    off = 0.5 if aligned else 0.0
    for r, (b, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        sx, sy = x1 * scale - off, y1 * scale - off
        rw, rh = x2 * scale - off - sx, y2 * scale - off - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gh = ratio if ratio > 0 else math.ceil(rh / out)
        gw = ratio if ratio > 0 else math.ceil(rw / out)
        for c in range(len(feat[0])):
            img = feat[int(b)][c]
            for i in range(out):
                for j in range(out):
                    acc = 0.0
                    for iy in range(gh):
                        y = sy + i * rh / out + (iy + 0.5) * rh / out / gh
                        for ix in range(gw):
                            x = sx + j * rw / out + (ix + 0.5) * rw / out / gw
                            acc += _bilinear(img, y, x)
                    res[r, c, i, j] = acc / max(gh * gw, 1)
    return res


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    rois = []
    for k in range(14):
        x1, y1 = (torch.rand(2, generator=g, dtype=torch.float64) * 50 - 8).tolist()
        w, h = (torch.rand(2, generator=g, dtype=torch.float64) * 40).tolist()
        rois.append([k % 2, x1, y1, x1 + w, y1 + h])
    rois.append([0, 100.0, 100.0, 120.0, 130.0])  # entirely outside: all zeros
    rois.append([1, 10.0, 10.0, 10.0, 10.0])      # empty box
    return feat, torch.tensor(rois, dtype=torch.float64)


@pytest.mark.parametrize("ratio,aligned", [(2, True), (2, False), (0, True), (-1, False), (1, True)])
def test_roi_align_matches_naive_reference(ratio, aligned):
    feat, rois = _inputs(seed=ratio + 7 * aligned)
    scale = 0.25
    ours = roi_align(feat, rois, 3, scale, ratio, aligned)
    ref = _reference(feat, rois, 3, scale, ratio, aligned)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    # float32 path and list-of-boxes input agree too
    per_image = [rois[rois[:, 0] == i, 1:].float() for i in range(2)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).squeeze(1) for i in range(2)])
    ours32 = roi_align(feat.float(), per_image, 3, scale, ratio, aligned)
    torch.testing.assert_close(ours32, ref[order].float(), rtol=1e-4, atol=1e-4)


def test_roi_align_matches_torchvision_python_implementation():
    """torchvision's eager Python RoIAlign (the function under its lazy ``torch.compile``).

    That transcription skips the CUDA kernel's "sample outside [-1, size] -> 0" rule, so the
    comparison uses RoIs inside the feature map, where both define the same thing.
    """
    try:
        import torchvision.ops  # noqa: F401
        tv = sys.modules["torchvision.ops.roi_align"]._roi_align
        tv = getattr(tv, "__wrapped__", tv)  # eager, no compiler needed
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"torchvision's python RoIAlign not importable: {err}")
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    xy = torch.rand(12, 2, generator=g, dtype=torch.float64) * torch.tensor([30.0, 22.0])
    wh = torch.rand(12, 2, generator=g, dtype=torch.float64) * torch.tensor([14.0, 14.0])
    rois = torch.cat([(torch.arange(12) % 2)[:, None].double(), xy, xy + wh], dim=1)
    for ratio, aligned in [(2, True), (0, False), (0, True), (3, False)]:
        ref = tv(feat, rois, 0.25, 4, 5, ratio, aligned)
        ours = roi_align(feat, rois, (4, 5), 0.25, ratio, aligned)
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_roi_align_backward_reaches_features():
    feat, rois = _inputs(seed=5)
    feat.requires_grad_(True)
    out = roi_align(feat, rois, 2, 0.25, 2, True)
    out.sum().backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0
    # gradient of the sum equals the total sampling weight each pixel receives
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois[:3], 2, 0.25, 2, True),
                                    (feat.detach()[:, :1].clone().requires_grad_(True),))


def test_mask_targets_and_paste_roundtrip():
    masks = torch.zeros(2, 40, 50, dtype=torch.uint8)
    masks[0, 10:30, 5:25] = 1
    masks[1, 0:40, 30:50] = 1
    boxes = torch.tensor([[5.0, 10, 25, 30], [30.0, 0, 50, 40]])
    t = mask_targets(masks, torch.tensor([0, 1]), boxes, 14)
    assert torch.equal(t, torch.ones(2, 14, 14))  # box == mask extent: the target is full
    t = mask_targets(masks, torch.tensor([0]), torch.tensor([[0.0, 0, 50, 40]]), 10)
    expected = torch.zeros(10, 10)
    expected[2:8, 1:5] = 1  # the mask covers x 5..25 of 50 and y 10..30 of 40: cells 1..4, 2..7
    assert torch.equal(t[0], expected)
    pasted = paste_masks(torch.ones(2, 28, 28), boxes, 40, 50) > 0.5
    assert torch.equal(pasted, masks.bool())


def test_adaptive_sample_count_rounds_like_the_kernel():
    """The count is ceil(roi / bins) with the RoI size taken as (x2*s - off) - (x1*s - off), in
    the compute dtype, as the kernel does. For these fp32 RoIs (found by search) (x2 - x1)*s
    rounds to the other side of an integer, which would change the number of samples."""
    try:
        import torchvision.ops  # noqa: F401
        tv = sys.modules["torchvision.ops.roi_align"]._roi_align
        tv = getattr(tv, "__wrapped__", tv)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"torchvision's python RoIAlign not importable: {err}")
    x = torch.tensor([[184.4536895751953, 347.7870178222656], [380.44720458984375, 427.1138610839844],
                      [273.3768005371094, 296.71014404296875]])
    rois = torch.cat([torch.zeros(3, 1), x[:, :1], torch.full((3, 1), 2.0), x[:, 1:],
                      torch.full((3, 1), 30.0)], dim=1)
    scale = 0.3
    size = ((x[:, 1] * scale - 0.5) - (x[:, 0] * scale - 0.5))
    assert not torch.equal(torch.ceil(size / 7), torch.ceil((x[:, 1] - x[:, 0]) * scale / 7))
    feat = torch.randn(1, 2, 12, 140, generator=torch.Generator().manual_seed(1))
    ours = roi_align(feat, rois, (1, 7), scale, 0, True)
    torch.testing.assert_close(ours, tv(feat, rois, scale, 1, 7, 0, True), rtol=1e-5, atol=1e-5)


def test_nan_rois_pool_to_zero_like_the_kernel():
    feat = torch.randn(1, 2, 6, 6)
    rois = torch.tensor([[0, float("nan"), 1.0, 3.0, 3.0], [0, 1.0, 1.0, 3.0, 3.0]])
    for ratio in (2, 0):
        out = roi_align(feat, rois, 2, 1.0, ratio, True)
        assert torch.equal(out[0], torch.zeros(2, 2, 2))
        assert torch.isfinite(out[1]).all() and out[1].abs().sum() > 0
