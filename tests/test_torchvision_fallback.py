"""torchvision's nms / batched_nms / roi_align / MultiScaleRoIAlign on agvm-ds's kernels where
torchvision's compiled ops are missing (agvm_ds.ops.torchvision_fallback), and only there.

References are independent of agvm_ds: the textbook greedy NMS of tests/test_ops_boxes_nms.py and
torchvision's own eager Python RoIAlign (the transcription of its CUDA kernel).
"""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import agvm_ds  # noqa: F401  (first: on CPU-only torch torchvision imports only after it)
from agvm_ds.ops import torchvision_fallback
from test_ops_boxes_nms import _greedy_nms, _random_boxes

REPO = Path(__file__).resolve().parents[1]


def _eager_roi_align():
    tv = sys.modules["torchvision.ops.roi_align"]._roi_align
    return getattr(tv, "__wrapped__", tv)


def test_import_agvm_ds_first_then_torchvision_detectors_find_the_ops():
    """A fresh process in the documented order: the hook installs right after torchvision's
    import (not at a mere availability check before it), and a torchvision Faster R-CNN runs its
    NMS-heavy inference without any patching."""
    code = ("import importlib.util, agvm_ds, torch\n"
            "assert importlib.util.find_spec('torchvision')  # an availability check (transformers does one)\n"
            "import torchvision\n"
            "from torchvision.extension import _has_ops\n"
            "from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn as f\n"
            "m = f(weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64).eval()\n"
            "out = m([torch.rand(3, 64, 64)])[0]\n"
            "print(_has_ops(), getattr(torchvision.ops.nms, '_agvm_ds_fallback', False), sorted(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    has_ops, patched, keys = proc.stdout.strip().split(" ", 2)
    assert patched == str(has_ops == "False"), proc.stdout  # patched exactly when the ops are missing
    assert keys == "['boxes', 'labels', 'scores']"


def test_patched_ops_match_independent_references():
    import torchvision
    from torchvision.extension import _has_ops
    from torchvision.ops import MultiScaleRoIAlign

    if _has_ops():
        assert not torchvision_fallback.installed()  # working kernels are never replaced
        return
    assert torchvision_fallback.installed()
    boxes = _random_boxes(60, seed=4).float()
    scores = torch.rand(60, generator=torch.Generator().manual_seed(5))
    classes = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(6))
    assert torchvision.ops.nms(boxes, scores, 0.5).tolist() == _greedy_nms(boxes, scores, 0.5)
    assert torchvision.ops.boxes.batched_nms(boxes, scores, classes, 0.4).tolist() == \
        _greedy_nms(boxes, scores, 0.4, classes)

    eager = _eager_roi_align()
    g = torch.Generator().manual_seed(7)
    feats = OrderedDict(p2=torch.randn(2, 4, 16, 16, generator=g), p3=torch.randn(2, 4, 8, 8, generator=g))
    per_image = [torch.tensor([[2.0, 3.0, 20.0, 30.0], [10.0, 4.0, 60.0, 56.0]]),
                 torch.tensor([[0.5, 0.5, 12.0, 9.0]])]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(per_image)])
    got = torchvision.ops.roi_align(feats["p2"], per_image, (3, 3), 0.25, 2, True)
    torch.testing.assert_close(got, eager(feats["p2"], rois, 0.25, 3, 3, 2, True), rtol=1e-5, atol=1e-6)
    # MultiScaleRoIAlign: each box pooled from the level its size maps to (canonical 224 at
    # level 4, clamped to the two levels here: every box is small, so all come from p2)
    pooler = MultiScaleRoIAlign(["p2", "p3"], output_size=3, sampling_ratio=2)
    got = pooler(feats, per_image, [(64, 64), (64, 64)])
    torch.testing.assert_close(got, eager(feats["p2"], rois, 0.25, 3, 3, 2, False), rtol=1e-5, atol=1e-6)


def test_working_compiled_ops_are_never_replaced(monkeypatch):
    import torchvision
    import torchvision.extension

    for (site, op), original in list(torchvision_fallback.ORIGINALS.items()):
        monkeypatch.setattr(sys.modules[site], op, original)
    monkeypatch.setattr(torchvision.extension, "_has_ops", lambda: True)
    assert torchvision_fallback.install() is False
    assert not getattr(torchvision.ops.nms, "_agvm_ds_fallback", False)
    assert not getattr(torchvision.ops.poolers.roi_align, "_agvm_ds_fallback", False)
