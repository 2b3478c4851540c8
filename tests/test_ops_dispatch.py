"""Dispatch of nms / batched_nms / roi_align to torchvision's compiled kernels.

The compiled kernels do not load on this CPU-only torch, so "available" is simulated with
fakes that record their calls and behave like the kernels (the NMS fake sorts ties in the
*wrong* order, as torchvision's CUDA kernel may, whose sort is unstable; the RoIAlign
fake is torchvision's own eager Python transcription of its CUDA kernel). Our ops must call
them with the kernel's argument format and still return what the pure-torch path returns.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch

import agvm_ds  # noqa: F401  (torchvision compat)
from agvm_ds.ops import _dispatch, batched_nms, nms, roi_align
from test_ops_boxes_nms import _greedy_nms, _random_boxes


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(_dispatch, "_cache", {})
    monkeypatch.setattr(_dispatch, "_reasons", {})


def _kernel_like_nms(boxes, scores, thr):
    """torchvision's kernel, naively: its own score sort, here with ties *higher* index first."""
    b, s = boxes.tolist(), scores.tolist()
    order = sorted(range(len(b)), key=lambda i: (-s[i], -i))

    def iou(p, q):
        iw = max(min(p[2], q[2]) - max(p[0], q[0]), 0.0)
        ih = max(min(p[3], q[3]) - max(p[1], q[1]), 0.0)
        inter = iw * ih
        union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
        return inter / union if union != 0 else float("nan")

    keep = []
    for i in order:
        if all(not iou(b[k], b[i]) > thr for k in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.int64)


class Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args):
        self.calls.append(args)
        return self.fn(*args)


def _tied_boxes(n, seed):
    """Integer boxes on a coarse grid (many duplicates and exact-threshold IoUs), few scores."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 6, (n, 2), generator=g).float() * 2
    wh = torch.randint(1, 4, (n, 2), generator=g).float() * 2
    scores = torch.randint(0, 4, (n,), generator=g).float() / 4
    return torch.cat([xy, xy + wh], 1), scores


def test_nms_uses_the_compiled_kernel_with_our_order_and_semantics(monkeypatch):
    fake = Recorder(_kernel_like_nms)
    monkeypatch.setitem(_dispatch._cache, ("nms", "cpu"), fake)
    boxes, scores = _tied_boxes(80, seed=1)
    for thr in (0.0, 0.25, 0.5):
        fake.calls.clear()
        ref = _greedy_nms(boxes.double(), scores, thr)  # ties: lower index first
        got = nms(boxes.half(), scores, thr)
        assert got.tolist() == ref
        assert len(fake.calls) == 1
        b, s, t = fake.calls[0]
        assert b.dtype == torch.float32 and t == thr  # fp16 boxes compared in fp32
        assert (s[:-1] > s[1:]).all(), "the kernel must get strictly decreasing scores"


def test_batched_nms_calls_the_kernel_once_per_category(monkeypatch):
    fake = Recorder(_kernel_like_nms)
    monkeypatch.setitem(_dispatch._cache, ("nms", "cpu"), fake)
    boxes, scores = _tied_boxes(120, seed=2)
    classes = torch.randint(0, 3, (120,), generator=torch.Generator().manual_seed(3))
    ref = _greedy_nms(boxes.double(), scores, 0.5, classes)
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == ref
    assert len(fake.calls) == 3
    assert sum(len(c[0]) for c in fake.calls) == 120


def test_without_the_kernel_the_torch_path_runs(monkeypatch):
    def refuse(*args):
        raise AssertionError("compiled op called although unavailable")
    monkeypatch.setitem(_dispatch._cache, ("nms", "cpu"), None)
    monkeypatch.setitem(_dispatch._cache, ("roi_align", "cpu"), None)
    monkeypatch.setattr(_dispatch, "_load", refuse)
    boxes, scores = _tied_boxes(50, seed=4)
    assert nms(boxes, scores, 0.5).tolist() == _greedy_nms(boxes.double(), scores, 0.5)
    feat = torch.randn(1, 2, 6, 6)
    assert roi_align(feat, torch.tensor([[0.0, 1, 1, 4, 4]]), 2, 1.0, 2, True).shape == (1, 2, 2, 2)


def _tv_python_roi_align():
    try:
        import torchvision.ops  # noqa: F401
        fn = sys.modules["torchvision.ops.roi_align"]._roi_align
        return getattr(fn, "__wrapped__", fn)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"torchvision's python RoIAlign not importable: {err}")


def _inside_rois(k, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g, dtype=dtype) * torch.tensor([30.0, 22.0], dtype=dtype)
    wh = torch.rand(k, 2, generator=g, dtype=dtype) * 14.0
    return torch.cat([(torch.arange(k) % 2)[:, None].to(dtype), xy, xy + wh], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roi_align_uses_the_compiled_kernel_with_its_argument_format(monkeypatch, dtype):
    tv = _tv_python_roi_align()
    feat = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(5)).to(dtype)
    rois = _inside_rois(10, seed=6)  # float64 rois with lower-precision features
    monkeypatch.setitem(_dispatch._cache, ("roi_align", "cpu"), None)
    torch_path = roi_align(feat, rois, (4, 5), 0.25, 0, True)
    fake = Recorder(tv)
    monkeypatch.setitem(_dispatch._cache, ("roi_align", "cpu"), fake)
    got = roi_align(feat, rois, (4, 5), 0.25, 0, True)
    assert len(fake.calls) == 1
    x, r, scale, ph, pw, ratio, aligned = fake.calls[0]
    assert x.dtype == r.dtype == torch.float32  # the kernel needs equal dtypes; never bf16
    assert r.shape == (10, 5) and torch.equal(r[:, 0], (torch.arange(10) % 2).float())
    assert (scale, ph, pw, ratio, aligned) == (0.25, 4, 5, 0, True)
    assert got.dtype == dtype and torch_path.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), torch_path.float(), rtol=tol, atol=tol)


def test_roi_align_under_autocast_computes_in_fp32_and_keeps_the_input_dtype():
    """torchvision's autocast rule: ``roi_align(input.float(), rois.float()).to(input.dtype)``."""
    tv = _tv_python_roi_align()
    feat = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(7))
    rois = _inside_rois(12, seed=8, dtype=torch.float32)
    plain = roi_align(feat, rois, 3, 0.25, 2, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto32 = roi_align(feat, rois, 3, 0.25, 2, False)
        auto16 = roi_align(feat.bfloat16(), rois, 3, 0.25, 2, False)
    assert auto32.dtype == torch.float32 and torch.equal(auto32, plain)
    ref = tv(feat.bfloat16().float(), rois, 0.25, 3, 3, 2, False).to(torch.bfloat16)
    assert auto16.dtype == torch.bfloat16
    # one rounding of an fp32 result: at most one bf16 ulp from the reference
    torch.testing.assert_close(auto16.float(), ref.float(), rtol=2 ** -7, atol=1e-6)


def test_probe_runs_once_logs_the_path_and_matches_torchvision(fresh_cache, monkeypatch, caplog):
    from torchvision.extension import _has_ops

    calls = []
    real = _dispatch._load
    monkeypatch.setattr(_dispatch, "_load", lambda *a: calls.append(a) or real(*a))
    with caplog.at_level(logging.INFO, logger="agvm_ds.ops"):
        first = _dispatch.compiled_op("nms", torch.device("cpu"))
        second = _dispatch.compiled_op("nms", torch.device("cpu"))
    assert calls == [("nms", "cpu")] and first is second
    assert (first is not None) == _has_ops()  # no compiled ops here: the torch path
    lines = [r.getMessage() for r in caplog.records if r.name == "agvm_ds.ops"]
    assert len(lines) == 1 and "nms on cpu" in lines[0]
    assert ("compiled kernel" in lines[0]) == (first is not None)


def test_env_switch_forces_the_torch_path(fresh_cache, monkeypatch):
    monkeypatch.setenv("AGVM_DS_TORCHVISION_OPS", "0")
    assert _dispatch.compiled_op("roi_align", torch.device("cpu")) is None
    assert _dispatch._reasons[("roi_align", "cpu")] == "AGVM_DS_TORCHVISION_OPS=0"
    assert _dispatch.active_paths("cpu") == {"nms": "torch", "roi_align": "torch"}
