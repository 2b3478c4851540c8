"""Evaluation does not depend on how it is split (issue 31 item 7): one checkpoint, a COCO
folder whose images differ in size, and the same metrics — and the same predictions — at 1
and 2 gloo ranks and at eval batch 1 and 4.

The model is an untrained but seeded tiny RetinaNet that keeps its low-scoring boxes, so
every image yields detections and the COCO stats are non-trivial numbers to compare. The
reference is the batch-1, one-process evaluation: there every image is padded only to its
own multiple of 32, which is what a batch of one gives by construction.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agvm_ds.testing.distributed import run_distributed

SPEC = "models/retinanet_uninet_tiny.json"
OVERRIDES = {"head.score_thresh": 0.0, "head.topk_candidates": 200, "head.max_detections": 50}
#: (width, height): at a 64-px short side (long side capped at 128) they pad to 64x64, 64x128 and
#: 128x64 (h x w); in a batch of 4 the smaller ones used to be padded to their neighbours' size;
#: 2 ranks take 3 each (the last one a repeat, not scored)
SIZES = [(64, 64), (80, 48), (48, 96), (120, 40), (40, 72)]


def _folder(root: Path) -> Path:
    """A COCO val split of 5 images of several sizes, two boxes each (two categories)."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    images, anns = [], []
    for k, (w, h) in enumerate(SIZES, start=1):
        pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        for j, cat in enumerate((1, 2)):
            bw, bh = w // 2, h // 2
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            pixels[y:y + bh, x:x + bw] = (200, 40, 40) if cat == 1 else (40, 200, 40)
            anns.append({"id": 2 * k + j, "image_id": k, "category_id": cat, "iscrowd": 0,
                         "bbox": [x, y, bw, bh], "area": bw * bh})
        Image.fromarray(pixels).save(root / "val" / f"{k:04d}.png")
        images.append({"id": k, "file_name": f"{k:04d}.png", "width": w, "height": h})
    doc = {"images": images, "annotations": anns,
           "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(doc))
    return root


def _evaluate(root: str, batch: int, results: str) -> dict:
    from agvm_ds.data.coco import CocoDataset
    from agvm_ds.data.transforms import Transform
    from agvm_ds.evaluation.distributed import evaluate_dataset
    from agvm_ds.models import build_model

    torch.manual_seed(0)
    model = build_model(SPEC, num_classes=2, overrides=OVERRIDES).eval()
    val = CocoDataset(root, "val", task="detection", transform=Transform(64, 128))
    return evaluate_dataset(model, val, batch_size=batch, results_file=results)


def _rank_fn(rank, world_size, root, results):
    torch.set_num_threads(1)  # two ranks on two cores
    return [_evaluate(root, batch, f"{results}{batch}.json") for batch in (1, 4)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory.mktemp("sizes"))


def test_metrics_equal_at_any_batch_size_and_rank_count(folder, tmp_path):
    reference = _evaluate(str(folder), 1, str(tmp_path / "b1.json"))
    print("batch 1, 1 rank:", {k: round(v, 4) for k, v in reference.items() if k.endswith("AP")})
    assert len(reference) == 12 and 0.0 < reference["bbox_AP"] < 1.0  # non-trivial numbers
    batched = _evaluate(str(folder), 4, str(tmp_path / "b4.json"))
    assert batched == reference
    ranks = run_distributed(_rank_fn, 2, str(folder), str(tmp_path / "r2_b"))
    assert len(ranks) == 2 and all(stats == reference for both in ranks for stats in both)
    # the predictions themselves, box for box: equal up to float rounding (a batch of 4
    # same-size images runs other conv kernels than a batch of 1: |diff| ~ 1e-6 px)
    first = _rows(tmp_path / "b1.json")
    assert len(first) > 50
    for other in ("b4.json", "r2_b1.json", "r2_b4.json"):
        rows = _rows(tmp_path / other)
        assert rows.shape == first.shape and np.allclose(rows, first, rtol=0, atol=1e-3), other


def _rows(path: Path) -> np.ndarray:
    """COCO results as rows ``[image, category, x, y, w, h, score]``, in one fixed order."""
    rows = np.array([[r["image_id"], r["category_id"], *r["bbox"], r["score"]]
                     for r in json.loads(path.read_text())])
    return rows[np.lexsort(rows[:, :6].T[::-1])]
