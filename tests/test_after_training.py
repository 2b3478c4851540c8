"""Life after training (issue 25): evaluate a checkpoint, export it, load it, predict on images.

One tiny 2-rank ZeRO-3 run per model family (a Mask R-CNN for boxes and masks, a Semantic
FPN for label maps), shared by the checks through a module-scoped fixture. The references
are independent of the code under test: the AP / mIoU the training job itself wrote
(``eval.json``, from the DeepSpeed engine's ZeRO-3 module), and DeepSpeed's own
``zero_to_fp32`` reader for the gathered weights.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from train_helpers import REPO, TINY, run_train, tail, write_config

sys.path.insert(0, str(REPO))  # the launch/ scripts, imported as modules

pytestmark = pytest.mark.slow

FAMILIES = {  # model section, task, lr, steps, lr decay point (fraction of the steps)
    # After 4 steps the boxes score low and the mask logits are low: keep every box (up to 100,
    # as COCO does) and a mask threshold of 0.2, so that both APs have matches to agree on
    # (measured: bbox AP 0.042, segm AP 0.0002; at 0.02 the masks fill their boxes, segm AP 0)
    "mask_rcnn": ({"spec": "models/mask_rcnn_uninet_tiny.json", "num_classes": 6,
                   "overrides": {"roi_box.score_thresh": 0.0, "roi_mask.mask_threshold": 0.2}},
                  "instance", 0.02, 4, 0.75),
    # 10 steps at lr 0.1: the first model that labels some pixels other than background
    "semantic_fpn": ({"spec": "models/semantic_fpn_uninet_tiny.json", "num_classes": 7},
                     "semantic", 0.1, 10, 0.9),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, tmp_path_factory):
    """(family, run dir, checkpoint dir) of a 2-rank ZeRO-3 run that evaluated at its end."""
    family = request.param
    model, task, lr, steps, decay_at = FAMILIES[family]
    tmp = tmp_path_factory.mktemp(family)
    cfg = copy.deepcopy(TINY)
    cfg["zero_optimization"] = {"stage": 3}
    cfg["optimizer"]["params"]["lr"] = lr
    cfg["model"], cfg["data"]["task"] = model, task
    cfg["data"]["synthetic"]["train"] = 16  # and 8 val images
    cfg["train"].update(max_steps=steps, warmup_steps=1, milestones=[decay_at], checkpoint_every=0,
                        eval_at_end=True)
    cfg["train"]["grad_clip"] = {"max_norm": 1.0, "start_step": 0, "end_step": 1}
    proc = run_train(write_config(tmp / "tiny.json", cfg), tmp / "run")
    assert proc.returncode == 0, tail(proc)
    return family, tmp / "run", tmp / "run" / "checkpoints" / f"step_{steps:07d}"


def _scalars(path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items()
            if isinstance(v, float) and k != "eval_time_s"}


def test_evaluate_export_predict_agree_with_training(trained, tmp_path, capsys):
    import agvm_ds
    from agvm_ds.data import build_dataset
    from agvm_ds.config.data import DataConfig
    from agvm_ds.evaluation.results import to_coco_results
    from agvm_ds.inference.model_dir import build_network
    from launch import evaluate, export, predict

    family, run_dir, ckpt = trained
    steps = FAMILIES[family][3]

    # 1. one process evaluates the 2-rank ZeRO-3 checkpoint: training's own numbers
    assert evaluate.main(["--model", str(ckpt), "--output_dir", str(tmp_path / "eval")]) == 0
    ours, ref = _scalars(tmp_path / "eval" / "eval.json"), _scalars(run_dir / "eval.json")
    assert ours.keys() == ref.keys() and len(ref) >= 3
    for key in ref:
        assert abs(ours[key] - ref[key]) <= 1e-3, (key, ours[key], ref[key])
    # something was found, so the equality above compares matches, not two empty sets
    if family == "semantic_fpn":
        iou = json.loads((run_dir / "eval.json").read_text())["IoU"]
        assert any(v for name, v in iou.items() if name != "background"), iou
    else:
        assert ref["bbox_AP"] > 0 and ref["segm_AP"] > 0, ref
    whole = json.loads((tmp_path / "eval" / "eval.json").read_text())
    training = json.loads((run_dir / "eval.json").read_text())
    assert whole.keys() == training.keys() and whole["step"] == training["step"] == steps
    if family == "semantic_fpn":  # per-class IoU too
        assert whole["IoU"].keys() == training["IoU"].keys()
        for name, v in training["IoU"].items():
            assert (v is None and whole["IoU"][name] is None) or abs(whole["IoU"][name] - v) <= 1e-3

    # 2. export -> load_model -> predict on the val images: what the evaluation scored
    assert export.main(["--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "export")]) == 0
    model = agvm_ds.load_model(tmp_path / "export")
    assert not model.training and model.info["source"]["zero_stage"] == 3
    val = build_dataset(DataConfig.model_validate(model.info["run"]["data"]), "val", train=False)
    if family == "semantic_fpn":
        paths = [val.image_path(i) for i in val.ids]
    else:
        paths = [val.image_root / val.coco.imgs[i]["file_name"] for i in val.ids]
    if family == "mask_rcnn":
        paths = paths[:2]  # two show it; each image is a Mask R-CNN forward of CPU time
    preds = model.predict(paths)
    assert len(preds) == len(paths)
    if family == "semantic_fpn":
        for path, pred in zip(paths, preds):
            scored = np.array(Image.open(tmp_path / "eval" / "labels" / f"{path.stem}.png"))
            assert np.array_equal(pred["sem_seg"].numpy(), scored), path
        assert any(int(p["sem_seg"].max()) > 0 for p in preds)  # not all background
    else:
        ids = list(val.ids)[:len(paths)]
        scored = [r for r in json.loads((tmp_path / "eval" / "predictions.json").read_text())
                  if r["image_id"] in ids]
        mine = to_coco_results(preds, ids, model.info["category_ids"])
        assert len(mine) == len(scored) > 0
        assert any(p["masks"].any() for p in preds)  # masks to compare, not empty ones
        key = lambda r: (r["image_id"], -r["score"], r["category_id"])  # noqa: E731
        for a, b in zip(sorted(mine, key=key), sorted(scored, key=key)):
            assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
            assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
            assert a["segmentation"] == b["segmentation"]

    # 3. the export holds DeepSpeed's own reconstruction of the ZeRO-3 weights; the backbone
    # file loads into a freshly built backbone on its own
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    with capsys.disabled():  # zero_to_fp32 prints progress
        ds = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    for name, value in ds.items():
        assert torch.equal(exported[name], torch.as_tensor(value.contiguous())), name
    backbone = build_network(model.info).backbone
    backbone.load_state_dict(load_file(str(tmp_path / "export" / "backbone.safetensors")), strict=True)
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, exported["backbone." + name]), name

    # 4. launch/predict.py on a folder: JSON keyed by file name, one PNG each, a non-image skipped
    shown = [p for p, pred in zip(paths, preds)  # images with something to draw
             if (pred["sem_seg"].max() > 0 if family == "semantic_fpn" else len(pred["boxes"]))][:2]
    folder = tmp_path / "images"
    folder.mkdir()
    for p in shown:
        shutil.copy(p, folder / p.name)
    (folder / "notes.txt").write_text("not an image")
    capsys.readouterr()
    assert predict.main(["--model", str(tmp_path / "export"), "--images", str(folder),
                         "--output_dir", str(tmp_path / "pred"), "--score_threshold", "0"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {folder / 'notes.txt'}: not an image, skipped" in err
    records = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert sorted(records) == sorted(p.name for p in shown) and len(shown) == 2
    for p in shown:
        drawn = Image.open(tmp_path / "pred" / f"{p.stem}.png")
        original = Image.open(p).convert("RGB")
        assert drawn.size == original.size
        assert not np.array_equal(np.array(drawn), np.array(original))  # something was drawn
    if family == "semantic_fpn":
        first = records[shown[0].name]
        first_size = Image.open(shown[0]).size
        assert sum(first["pixels"].values()) == first_size[0] * first_size[1]
        assert set(first["pixels"]) <= set(model.class_names)
    else:
        assert all(r["category_name"] in model.class_names for rs in records.values() for r in rs)
        assert sum(len(rs) for rs in records.values()) > 0

    # 5. the run's config.json reloads on another number of ranks (item 4)
    from agvm_ds.config.run import load_run_config

    for world in (1, 2, 4):
        run = load_run_config(run_dir / "config.json", world_size=world)
        assert run.global_batch == 8 and run.grad_accum * world * run.micro_batch == 8
