"""A micro-batch without foreground on one rank (issue 24, item 2): no hang under ZeRO-3.

Mask R-CNN's mask head used to skip its forward when a micro-batch had no foreground RoI;
ZeRO-3 gathers a module's parameters in its forward hook, so a rank that skipped the head
while another ran it waited in a different collective: the step never finished (ZeRO-2
survived; AGVM on or off alike). The head now runs on one dummy RoI with a zero weight.

* through the API (``agvm_ds.initialize``, ZeRO-3, 2 gloo ranks, AGVM on): rank 1's image
  has no box at all, rank 0's has one; the step finishes, rank 1's mask loss is an exact 0
  and the ranks hold the same mask head afterwards;
* through the launcher: ``tests/test_launcher_runs.py`` (a COCO-layout dataset whose images
  drawn by rank 1 carry no annotation, ``data.filter_empty: false``, ZeRO-3, 2 ranks);
* ``data.filter_empty`` itself (default true: training skips such images, as detectron2 and
  mmdetection do): which training images the dataset keeps.
"""

from __future__ import annotations

import json

import pytest
import torch


HANG_S = 120  # a hang is reported after this long (the step itself takes ~15 s)


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
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
           "agvm": {"interval": 1, "start_step": 0}}
    engine, *_ = agvm_ds.initialize(model=model, config=cfg)
    engine.train()
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(rank))
    losses = engine(images, _targets(1 if rank == 0 else 0)[:1])  # rank 1: no foreground at all
    engine.backward(sum(losses.values()))
    engine.step()
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters(list(engine.module.roi_mask.parameters())):
        mask_head = torch.cat([p.detach().flatten().clone() for p in engine.module.roi_mask.parameters()])
    return {"loss_mask": float(losses["loss_mask"].detach()), "mask_head": mask_head,
            "steps": engine.global_steps, "mu": agvm_ds.modulation(engine)["mu"]}


@pytest.mark.slow
def test_zero3_step_with_a_rank_without_foreground_through_the_api():
    from agvm_ds.testing.distributed import run_distributed

    r0, r1 = run_distributed(_zero3_mask_rcnn, 2, timeout=HANG_S)
    assert r0["steps"] == r1["steps"] == 1
    assert r1["loss_mask"] == 0.0 and r0["loss_mask"] > 0
    torch.testing.assert_close(r0["mask_head"], r1["mask_head"], rtol=0, atol=0)  # one model
    assert r0["mu"] == r1["mu"] and set(r0["mu"]) >= {"roi_box", "roi_mask"}


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


def test_every_listed_image_is_checked_before_training(tmp_path):
    """Issue 24 item 6: a listed file that is not an image (or not the size its annotation
    says) is a DatasetError when the dataset is built, not a crash mid-training; the files
    that passed are remembered (by size and mtime) so a later build opens only new ones."""
    from agvm_ds.config.data import DataConfig
    from agvm_ds.data import build_dataset
    from agvm_ds.data.errors import DatasetError

    from agvm_ds.data.synthetic import generate

    data = tmp_path / "data"
    generate(data, train=4, val=2, seed=0, size=64)
    cfg = DataConfig(root=str(data), cache_dir=str(tmp_path / "cache"), min_size=64, max_size=64)
    assert len(build_dataset(cfg, "train", train=True)) == 4
    assert len(list((tmp_path / "cache" / "image_headers").glob("headers-*.json"))) == 1
    doc = json.loads((data / "annotations" / "instances_train.json").read_text())
    bad = data / "train" / doc["images"][1]["file_name"]
    bad.write_text("not an image")
    with pytest.raises(DatasetError, match=rf"^{bad}: not an image PIL can read \(listed in .*instances_train.json\)$"):
        build_dataset(cfg, "train", train=True)
    other = data / "train" / doc["images"][2]["file_name"]
    from PIL import Image

    Image.new("RGB", (7, 5)).save(other)
    with pytest.raises(DatasetError, match=r"\(2 bad image files in all\)$"):
        build_dataset(cfg, "train", train=True)
