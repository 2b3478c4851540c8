"""Test-time size and score threshold of export / predict / evaluate (issue 32 item 3).

A random tiny RetinaNet (``head.score_thresh`` 0: it keeps boxes) in a hand-made checkpoint
(:func:`test_after_training_inputs._checkpoint`), trained at 64 px. References:

* the coordinate frame: an image ``J`` (40 x 52) predicted with ``--min_size 300`` is, inside
  the network, ``J`` resized to 300 x 390 with PIL's bilinear filter; the same resize done
  here and predicted at its own size (no resize: scale 1) gives boxes in the 300 x 390 frame,
  which divided by 7.5 must be ``J``'s boxes. A prediction left in the network's frame, or
  scaled twice, fails;
* test-time augmentation: the single-size predictions merged here by a float64 greedy
  class-wise NMS written as a plain loop, top ``max_detections`` by score.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from test_after_training_inputs import OVERRIDES, _checkpoint
from train_helpers import REPO

sys.path.insert(0, str(REPO))  # the launch/ scripts, imported as modules
from launch import evaluate, export, predict  # noqa: E402
from launch.tool_setup import cores_available, set_cpu_threads  # noqa: E402

W, H, SIDE, CAP = 40, 52, 300, 400  # J's size; --min_size 300 makes it 300 x 390 (scale 7.5)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    _, tag = _checkpoint(root)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "j.png")
    return root, tag


def _boxes(records: list[dict]) -> dict:
    """predictions.json's xywh results as (xyxy, score, category) sorted by score."""
    rows = sorted(records, key=lambda r: -r["score"])
    xyxy = [[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rows)]
    return {"boxes": torch.tensor(xyxy, dtype=torch.float64), "scores": [r["score"] for r in rows],
            "labels": [r["category_id"] for r in rows]}


def test_min_size_300_gives_boxes_in_the_images_own_pixels(model_files, tmp_path, capsys):
    import agvm_ds
    from agvm_ds.inference.test_time import apply_test_options

    root, tag = model_files
    args = ["--min_size", str(SIDE), "--max_size", str(CAP), "--score_threshold", "0"]
    assert predict.main(["--model", str(tag), "--images", str(root / "j.png"),
                         "--output_dir", str(tmp_path / "p"), *args]) == 0
    got = _boxes(json.loads((tmp_path / "p" / "predictions.json").read_text())["j.png"])
    assert len(got["scores"]) == OVERRIDES["head.max_detections"]

    # the reference: the resize done here, predicted at its own size (scale 1)
    big = Image.open(root / "j.png").convert("RGB").resize((SIDE, round(H * SIDE / W)), Image.BILINEAR)
    assert big.size == (300, 390)
    model = agvm_ds.load_model(tag)
    model.info = apply_test_options(model.info, [SIDE], CAP)
    ref = model.predict(big, score_threshold=0.0)[0]
    assert got["scores"] == pytest.approx(ref["scores"].tolist(), abs=1e-6)
    assert got["labels"] == [model.info["category_ids"][int(c)] for c in ref["labels"]]
    in_j = ref["boxes"].double() / (SIDE / W)
    assert torch.allclose(got["boxes"], in_j, atol=1e-3), (got["boxes"][:3], in_j[:3])
    assert float(got["boxes"][:, 2].max()) <= W and float(got["boxes"][:, 3].max()) <= H
    assert float(in_j[:, 2:].max()) > 8  # boxes of some size, not all squeezed into a corner

    # the export records the options; load_model(export).predict and predict.py use them
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "x"), *args]) == 0
    assert "test-time min_size 300, max_size 400, score threshold 0.0" in capsys.readouterr().out
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    assert (config["transform"]["min_size"], config["transform"]["max_size"], config["score_threshold"]) == \
        (SIDE, CAP, 0.0)
    exported = agvm_ds.load_model(tmp_path / "x").predict(root / "j.png")[0]  # no options given
    assert torch.allclose(exported["boxes"].double(), in_j, atol=1e-3)
    assert predict.main(["--model", str(tmp_path / "x"), "--images", str(root / "j.png"),
                         "--output_dir", str(tmp_path / "p2")]) == 0
    again = _boxes(json.loads((tmp_path / "p2" / "predictions.json").read_text())["j.png"])
    assert torch.equal(again["boxes"], got["boxes"]) and again["scores"] == got["scores"]

    # a size the model's cap would undo is one error line, before anything is predicted
    capsys.readouterr()
    assert predict.main(["--model", str(tag), "--images", str(root / "j.png"),
                         "--output_dir", str(tmp_path / "p3"), "--min_size", "300"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --min_size 300:") and "max_size 64" in err[0], err
    assert not (tmp_path / "p3" / "predictions.json").exists()


def _naive_merge(preds: list[dict], iou_thresh: float, top: int) -> list[tuple]:
    """Greedy class-wise NMS in float64, one box at a time; (box, score, label) best first."""
    rows = sorted(((b.double(), float(s), int(c)) for p in preds
                   for b, s, c in zip(p["boxes"], p["scores"], p["labels"])), key=lambda r: -r[1])

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    kept = []
    for box, score, label in rows:
        if all(lab != label or iou(box.tolist(), k.tolist()) <= iou_thresh for k, _, lab in kept):
            kept.append((box, score, label))
    return kept[:top]


def test_several_sizes_merge_like_a_naive_class_wise_nms(model_files, tmp_path):
    import agvm_ds
    from agvm_ds.inference.test_time import apply_test_options, merge_settings

    root, tag = model_files
    model = agvm_ds.load_model(tag)
    base = model.info
    singles = []
    for side in (64, 80):
        model.info = apply_test_options(base, [side], 100)
        singles.append(model.predict(root / "j.png", score_threshold=0.0)[0])
    model.info = apply_test_options(base, [64, 80], 100)
    merged = model.predict(root / "j.png", score_threshold=0.0)[0]
    nms_thresh, top = merge_settings(base["model_spec"])
    assert (nms_thresh, top) == (0.5, OVERRIDES["head.max_detections"])
    want = _naive_merge(singles, nms_thresh, top)
    assert len(merged["scores"]) == len(want) == top
    assert merged["scores"].tolist() == pytest.approx([s for _, s, _ in want], abs=1e-7)
    assert merged["labels"].tolist() == [c for _, _, c in want]
    assert torch.allclose(merged["boxes"].double(), torch.stack([b for b, _, _ in want]), atol=1e-5)
    # both sizes contribute (otherwise the merge would be one size's result)
    from_each = [sum(any(torch.equal(b, k) for k in p["boxes"]) for b in merged["boxes"]) for p in singles]
    assert all(n > 0 for n in from_each), from_each

    # evaluate.py with the same sizes scores the same merged predictions on the val images
    assert evaluate.main(["--model", str(tag), "--output_dir", str(tmp_path / "e"),
                          "--min_size", "64", "80", "--max_size", "100"]) == 0
    scored = json.loads((tmp_path / "e" / "predictions.json").read_text())
    from agvm_ds.config.data import DataConfig
    from agvm_ds.data import build_dataset

    val = build_dataset(DataConfig.model_validate(base["run"]["data"]), "val", train=False)
    first = list(val.ids)[0]
    mine = model.predict(val.image_root / val.coco.imgs[first]["file_name"], score_threshold=0.0)[0]
    theirs = sorted((r for r in scored if r["image_id"] == first), key=lambda r: -r["score"])
    assert [r["score"] for r in theirs] == pytest.approx(mine["scores"].tolist(), abs=1e-6)
    xywh = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in mine["boxes"].tolist()]
    assert torch.allclose(torch.tensor([r["bbox"] for r in theirs]), torch.tensor(xywh), atol=1e-3)


def test_option_checks():
    from agvm_ds.errors import ConfigError
    from agvm_ds.inference.test_time import apply_test_options

    info = {"task": "semantic", "transform": {"min_size": 64, "max_size": 128}}
    assert apply_test_options(info, [96], None)["transform"] == {"min_size": 96, "max_size": 128}
    with pytest.raises(ConfigError, match=r"^--min_size: several sizes .*semantic"):
        apply_test_options(info, [64, 96])
    with pytest.raises(ConfigError, match=r"^--score_threshold: must be in \[0, 1\]"):
        apply_test_options(info, score=1.5)


def test_one_process_tools_set_omp_num_threads_only_when_nobody_did(tmp_path):
    # torch is loaded in this process: the variable would change nothing, so it is left alone
    assert set_cpu_threads({}) is None
    import subprocess

    # in a fresh process, as a tool's main() runs it: the variables, and what torch then uses
    code = ("import sys; sys.path.insert(0, {root!r}); from launch.tool_setup import set_cpu_threads; "
            "import os; n = set_cpu_threads(); print(n, os.environ.get('OMP_NUM_THREADS'), "
            "os.environ.get('OMP_WAIT_POLICY'))").format(root=str(REPO))
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "RANK", "LOCAL_RANK", "WORLD_SIZE")}

    def run(torch_too: bool = False, **preset):
        line = code + ("; import torch; print(torch.get_num_threads())" if torch_too else "")
        return subprocess.run([sys.executable, "-c", line], env={**clean, **preset}, capture_output=True,
                              text=True).stdout.split()

    cores = str(cores_available())
    assert run(torch_too=True) == [cores, cores, "PASSIVE", cores]
    assert run(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE") == ["None", "1", "ACTIVE"]  # the user's
    assert run(RANK="0") == ["None", "None", "None"]  # a launcher's rank: the launcher's business
    # a cgroup quota of 1.5 CPUs caps the count at 2 whatever the affinity holds
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert cores_available(str(quota)) == min(2, len(os.sched_getaffinity(0)))
    quota.write_text("max 100000\n")
    assert cores_available(str(quota)) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("family", ["retinanet", "fasterrcnn"])
def test_a_torchvision_network_merges_sizes_with_its_own_nms_settings(family):
    """No spec (a ``model.builder`` network): the merge of several test sizes uses the
    torchvision detector's own NMS IoU and detections per image, not a fixed (0.5, 100)."""
    import agvm_ds  # noqa: F401  (first: makes torchvision importable on CPU torch)
    import torchvision
    from agvm_ds.inference.test_time import DEFAULT_DETECTIONS, DEFAULT_NMS, merge_settings

    detection = torchvision.models.detection
    if family == "retinanet":
        net = detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                                               nms_thresh=0.35, detections_per_img=42)
    else:
        net = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                          box_nms_thresh=0.35, box_detections_per_img=42)
    assert merge_settings({}, net) == (0.35, 42)
    assert merge_settings({}, torch.nn.Linear(2, 2)) == (DEFAULT_NMS, DEFAULT_DETECTIONS)  # nothing to read
    assert merge_settings({"head": {"nms_thresh": 0.6, "max_detections": 7}}, net) == (0.6, 7)  # the spec first
