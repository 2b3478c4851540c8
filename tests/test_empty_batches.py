"""A micro-batch without foreground on one rank (issue 24, item 2): no hang under ZeRO-3.

Mask R-CNN's mask head used to skip its forward when a micro-batch had no foreground RoI;
ZeRO-3 gathers a module's parameters in its forward hook, so a rank that skipped the head
while another ran it waited in a different collective: the step never finished (ZeRO-2
survived; AGVM on or off alike). The head now runs on one dummy RoI with a zero weight.

* through the API (``agvm_ds.initialize``, ZeRO-3, 2 gloo ranks): rank 1's images have no
  boxes at all, rank 0's have one; three steps finish, rank 1's mask loss is an exact 0 and
  the ranks end with the same weights;
* through the launcher: a COCO-layout dataset in which the images rank 1 draws carry no
  annotation, ``data.filter_empty: false`` (the default, true, skips them as detectron2 and
  mmdetection do), ZeRO-3, 2 ranks: the run finishes;
* ``data.filter_empty`` itself: which training images the dataset keeps.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from train_helpers import TINY, run_train, tail, write_config

HANG_S = 150  # a hang is reported after this long (the run itself takes ~20 s)


def _targets(n_boxes: int, size: int = 64) -> list[dict]:
    out = []
    for _ in range(2):
        t = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]])[:n_boxes],
             "labels": torch.tensor([1])[:n_boxes], "image_size": (size, size),
             "masks": torch.zeros(n_boxes, size, size, dtype=torch.uint8)}
        if n_boxes:
            t["masks"][0, 8:40, 8:40] = 1
        out.append(t)
    return out


def _zero3_mask_rcnn(rank, world):
    import agvm_ds
    from agvm_ds.models import build_model

    torch.manual_seed(0)
    model = build_model("mask_rcnn_uninet_tiny", num_classes=3)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
           "agvm": {"interval": 1, "start_step": 0}}
    engine, *_ = agvm_ds.initialize(model=model, config=cfg)
    engine.train()
    mask_losses = []
    for step in range(3):
        g = torch.Generator().manual_seed(step * 10 + rank)
        images = torch.rand(2, 3, 64, 64, generator=g)
        losses = engine(images, _targets(1 if rank == 0 else 0))  # rank 1: no foreground at all
        mask_losses.append(float(losses["loss_mask"].detach()))
        engine.backward(sum(losses.values()))
        engine.step()
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters(list(engine.module.roi_mask.parameters())):
        mask_head = torch.cat([p.detach().flatten().clone() for p in engine.module.roi_mask.parameters()])
    return {"mask_losses": mask_losses, "mask_head": mask_head, "steps": engine.global_steps,
            "mu": agvm_ds.modulation(engine)["mu"]}


@pytest.mark.slow
def test_zero3_step_with_a_rank_without_foreground_through_the_api():
    from agvm_ds.testing.distributed import run_distributed

    r0, r1 = run_distributed(_zero3_mask_rcnn, 2, timeout=HANG_S)
    assert r0["steps"] == r1["steps"] == 3
    assert r1["mask_losses"] == [0.0, 0.0, 0.0] and all(v > 0 for v in r0["mask_losses"])
    torch.testing.assert_close(r0["mask_head"], r1["mask_head"], rtol=0, atol=0)  # one model
    assert r0["mu"] == r1["mu"]


def _empty_for_rank(data_root, rank: int, steps: int) -> set[int]:
    """Remove the annotations of every image ``rank`` draws in the first ``steps`` steps (one
    image per micro-batch, 2 ranks, seed 0); return their ids. The other rank's images keep theirs."""
    from agvm_ds.train.sampler import StepSampler

    ann = data_root / "annotations" / "instances_train.json"
    doc = json.loads(ann.read_text())
    ids = sorted(img["id"] for img in doc["images"])
    drawn = {r: {ids[i] for mb in StepSampler(len(ids), 2, r, 1, 1, seed=0).iter_micro_batches(0, steps)
                 for i, _ in mb} for r in (0, 1)}
    empty = drawn[rank] - drawn[1 - rank]
    assert empty and not (drawn[rank] & drawn[1 - rank])
    with_boxes = {a["image_id"] for a in doc["annotations"]}
    assert drawn[1 - rank] <= with_boxes  # the other rank does have foreground
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] not in empty]
    ann.write_text(json.dumps(doc))
    return empty


@pytest.mark.slow
def test_zero3_mask_rcnn_run_with_a_rank_without_foreground_through_the_launcher(tmp_path):
    from agvm_ds.data.synthetic import generate

    data = tmp_path / "data"
    generate(data, train=16, val=4, seed=0, size=64)
    _empty_for_rank(data, rank=1, steps=3)
    cfg = copy.deepcopy(TINY)
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    cfg["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    cfg["model"] = {"spec": "models/mask_rcnn_uninet_tiny.json", "num_classes": 6}
    cfg["data"] = {"root": str(data), "task": "instance", "filter_empty": False,
                   "min_size": 64, "max_size": 64, "flip_prob": 0.0}
    cfg["agvm"] = {"interval": 1, "start_step": 0}
    cfg["train"] = {"max_steps": 3, "warmup_steps": 0, "checkpoint_at_end": False, "eval_at_end": False,
                    "plot": False}
    proc = run_train(write_config(tmp_path / "mask.json", cfg), tmp_path / "out", launcher="deepspeed",
                     timeout=HANG_S)
    assert proc.returncode == 0, tail(proc)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss_mask"] > 0 for r in rows)  # the mean over ranks: rank 0's part


def test_filter_empty_keeps_or_skips_images_without_annotations(tmp_path):
    from agvm_ds.config.data import DataConfig
    from agvm_ds.data import build_dataset
    from agvm_ds.data.synthetic import generate

    data = tmp_path / "data"
    generate(data, train=6, val=2, seed=0, size=64)
    ann = data / "annotations" / "instances_train.json"
    doc = json.loads(ann.read_text())
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != doc["images"][0]["id"]]
    ann.write_text(json.dumps(doc))
    base = {"root": str(data), "min_size": 64, "max_size": 64}
    assert DataConfig(**base).filter_empty is True  # the default, as detection users know it
    assert len(build_dataset(DataConfig(**base), "train", train=True)) == 5
    kept = build_dataset(DataConfig(**base, filter_empty=False), "train", train=True)
    assert len(kept) == 6
    empty = next(i for i in range(6) if kept.ids[i] == doc["images"][0]["id"])
    _, target = kept[empty]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert len(build_dataset(DataConfig(**base), "val", train=False)) == 2  # evaluation keeps every image
