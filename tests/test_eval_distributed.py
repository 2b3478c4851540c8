"""Distributed evaluation on 2 gloo ranks gives exactly the single-process numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agvm_ds.data.coco import CocoDataset
from agvm_ds.data.semantic import SemanticSegDataset
from agvm_ds.data.synthetic import generate
from agvm_ds.data.transforms import Transform
from agvm_ds.evaluation.distributed import evaluate_dataset
from agvm_ds.testing.distributed import run_distributed


class NoisyOracle:
    """A deterministic stand-in for a model: ground truth with misses, jitter, wrong labels,
    shifted masks and a false positive, seeded by image id (so any rank predicts the same)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.calls = 0  # predict calls: a ZeRO-3 forward is collective, ranks must agree
        self.images = 0

    def predict(self, images, targets):
        self.calls += 1
        self.images += len(targets)
        return [self._one(t) for t in targets]

    def _one(self, target):
        ds, image_id = self.dataset, target["image_id"]
        rng = np.random.default_rng(image_id)
        h, w = target["orig_size"]
        if isinstance(ds, SemanticSegDataset):
            gt = ds.load_sem_seg(ds.ids.index(image_id))
            noise = rng.integers(0, ds.num_classes, gt.shape)
            return {"sem_seg": np.where((rng.random(gt.shape) < 0.3) | (gt == 255), noise, gt)}
        boxes, scores, labels, masks = [], [], [], []
        for ann in ds.coco.imgToAnns[image_id]:
            if rng.random() < 0.15:
                continue  # missed object
            x, y, bw, bh = ann["bbox"]
            dx, dy = rng.normal(0, 0.08 * bw), rng.normal(0, 0.08 * bh)
            boxes.append([x + dx, y + dy, x + bw + dx, y + bh + dy])
            scores.append(rng.uniform(0.3, 1.0))
            label = ds.cat_ids.index(ann["category_id"])
            labels.append(label if rng.random() > 0.1 else (label + 1) % ds.num_classes)
            masks.append(np.roll(ds.coco.annToMask(ann), int(rng.integers(-2, 3)), axis=1))
        boxes.append([0, 0, w / 3, h / 3])  # a false positive
        scores.append(0.5)
        labels.append(0)
        masks.append(np.pad(np.ones((h // 3, w // 3), np.uint8), ((0, h - h // 3), (0, w - w // 3))))
        return {"boxes": np.array(boxes, dtype=np.float32), "scores": np.array(scores),
                "labels": np.array(labels), "masks": np.stack(masks).astype(bool)}


def build(root: Path):
    transform = Transform(64, 96)
    return (CocoDataset(root, "val", task="instance", transform=transform),
            SemanticSegDataset(root, "val", transform=transform))


def evaluate_both(root: Path) -> tuple[dict, dict, int, int]:
    instance, semantic = build(root)
    oracle = NoisyOracle(instance)
    inst = evaluate_dataset(oracle, instance, batch_size=2)
    sem = evaluate_dataset(NoisyOracle(semantic).predict, semantic, batch_size=2)
    return inst, sem, oracle.calls, oracle.images


def _rank_fn(rank, world_size, root):
    return evaluate_both(Path(root))


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    generate(root, train=1, val=7, seed=8, size=64)  # 7 images: 2 ranks need one padded repeat
    return root


def test_two_ranks_equal_one_rank(bench):
    inst1, sem1, _, images1 = evaluate_both(bench)
    assert images1 == 7
    assert 0.05 < inst1["bbox_AP"] < 0.95 and 0.05 < inst1["segm_AP"] < 0.95  # non-trivial
    assert set(inst1) >= {"bbox_AP", "bbox_ARl", "segm_AP", "segm_ARl"} and len(inst1) == 24
    assert 0.2 < sem1["mIoU"] < 0.95
    ranks = run_distributed(_rank_fn, 2, str(bench))
    # padded shards, and batches cut where padding would differ (images of several sizes):
    # both ranks still make the same number of predict calls
    assert ranks[0][2] == ranks[1][2] and ranks[0][3] >= 4 and ranks[1][3] >= 4
    for inst2, sem2, _, _ in ranks:
        assert inst2 == inst1  # exactly: same results in the same order, repeat dropped
        assert sem2 == sem1
