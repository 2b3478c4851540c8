"""COCO results conversion and COCO AP, including the launch/evaluate.py CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from agvm_ds.data.coco import coco_from_dict
from agvm_ds.data.synthetic import generate
from agvm_ds.evaluation import evaluate_coco, stat_keys, to_coco_results

REPO = Path(__file__).resolve().parents[1]
EVALUATE = REPO / "launch" / "evaluate.py"
sys.path.insert(0, str(REPO))  # the launch/ scripts, imported as modules
from launch import evaluate  # noqa: E402
from test_data_coco import ann, write_dataset  # noqa: E402


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    generate(root, train=2, val=10, seed=4, size=96)
    return root


def run_cli(*args):
    return subprocess.run([sys.executable, str(EVALUATE), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_to_coco_results_converts_boxes_ids_and_masks():
    mask = np.zeros((2, 6, 8), dtype=bool)
    mask[0, 1:3, 2:5] = True
    mask[1, 4:, :] = True
    preds = [{"boxes": torch.tensor([[1.0, 2.0, 4.0, 6.0], [0.0, 0.0, 8.0, 6.0]]),
              "scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([1, 0]),
              "masks": torch.from_numpy(mask)},
             {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}]
    res = to_coco_results(preds, [42, 43], cat_ids=[5, 11])
    assert len(res) == 2
    assert res[0]["image_id"] == 42 and res[0]["category_id"] == 11 and res[1]["category_id"] == 5
    assert res[0]["bbox"] == [1.0, 2.0, 3.0, 4.0] and res[0]["score"] == pytest.approx(0.9)
    for r, m in zip(res, mask):
        assert isinstance(r["segmentation"]["counts"], str)
        assert (mask_utils.decode(r["segmentation"]) == m).all()
    json.dumps(res)  # plain JSON types only
    without_boxes = to_coco_results([{"scores": [0.5], "labels": [0], "masks": mask[:1]}], [1], [5])
    assert without_boxes[0]["bbox"] == [2.0, 1.0, 3.0, 2.0]


def test_to_coco_results_rejects_inconsistent_input():
    good = {"boxes": [[0, 0, 1, 1]], "scores": [1.0], "labels": [0]}
    with pytest.raises(ValueError, match="2 predictions but 1 image ids"):
        to_coco_results([good, good], [1], [1])
    with pytest.raises(ValueError, match="label 3 outside 0..1"):
        to_coco_results([{**good, "labels": [3]}], [1], [1, 2])
    with pytest.raises(ValueError, match="same length"):
        to_coco_results([{**good, "scores": [1.0, 0.5]}], [1], [1])


def single_box_gt():
    return coco_from_dict({"images": [{"id": 1, "width": 100, "height": 100, "file_name": "x"}],
                           "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
                           "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                                            "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0}]})


def test_ap_matches_hand_computed_values():
    gt = single_box_gt()
    # Shift by 12 px in x: IoU = 38*50 / (2*2500 - 38*50) = 0.6129 → matched at IoU 0.50, 0.55,
    # 0.60 and missed at 0.65..0.95, so AP@[.5:.95] = 3/10, AP50 = 1, AP75 = 0.
    stats = evaluate_coco(gt, [{"image_id": 1, "category_id": 1, "bbox": [22, 10, 50, 50], "score": 0.8}])
    assert list(stats) == stat_keys("bbox")
    assert stats["bbox_AP"] == pytest.approx(0.3) and stats["bbox_AP50"] == pytest.approx(1.0)
    assert stats["bbox_AP75"] == 0.0 and stats["bbox_APl"] == -1.0  # no large GT: undefined
    # Wrong category: nothing matches. No detections at all: zero, not a crash.
    assert evaluate_coco(gt, [{"image_id": 1, "category_id": 2, "bbox": [10, 10, 50, 50],
                               "score": 1.0}])["bbox_AP"] == 0.0
    assert evaluate_coco(gt, [])["bbox_AP"] == 0.0
    with pytest.raises(ValueError, match="category_id 7 is not in the ground truth"):
        evaluate_coco(gt, [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1], "score": 1.0}])


def gt_as_detections(ann_file: Path) -> list[dict]:
    """Ground truth written back as detections: polygons and both RLE kinds → RLE."""
    coco = COCO(str(ann_file))
    out = []
    for a in coco.dataset["annotations"]:
        rle = coco.annToRLE(a)
        counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                    "score": 1.0, "segmentation": {"size": list(rle["size"]), "counts": counts}})
    return out


def test_ground_truth_scores_perfect_ap_through_the_cli(bench, tmp_path):
    gt_file = bench / "annotations" / "instances_val.json"
    dets = tmp_path / "dt.json"
    dets.write_text(json.dumps(gt_as_detections(gt_file)))
    proc = run_cli("--gt", gt_file, "--detections", dets, "--iou_type", "bbox", "--iou_type", "segm")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)  # one JSON object, nothing else on stdout
    assert list(stats) == stat_keys("bbox") + stat_keys("segm")
    for iou_type in ("bbox", "segm"):
        assert stats[f"{iou_type}_AP"] == 1.0 and stats[f"{iou_type}_AP50"] == 1.0
        assert stats[f"{iou_type}_AR100"] == 1.0


def test_dropping_detections_lowers_recall(bench):
    gt_file = bench / "annotations" / "instances_val.json"
    dets = gt_as_detections(gt_file)
    kept = dets[::2]  # half of the objects found, all exactly: recall = kept / all
    stats = evaluate_coco(COCO(str(gt_file)), kept, "segm")
    # Per-category AR100 = found/total in that category; the stat averages over categories.
    cats = sorted({d["category_id"] for d in dets})
    expected = np.mean([sum(d["category_id"] == c for d in kept) / sum(d["category_id"] == c for d in dets)
                        for c in cats])
    assert stats["segm_AR100"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="image_id 999999 is not in the ground truth"):
        evaluate_coco(COCO(str(gt_file)), [{**dets[0], "image_id": 999999}], "bbox")


def test_cli_errors_name_the_file(bench, tmp_path):
    gt_file = bench / "annotations" / "instances_val.json"
    missing = run_cli("--gt", tmp_path / "nope.json", "--detections", tmp_path / "dt.json")
    assert missing.returncode == 2 and "nope.json: annotation file not found" in missing.stderr
    (tmp_path / "dt.json").write_text("[{]")
    broken = run_cli("--gt", gt_file, "--detections", tmp_path / "dt.json")
    assert broken.returncode == 2 and "dt.json: malformed JSON" in broken.stderr
    assert "Traceback" not in missing.stderr + broken.stderr
    bad_type = run_cli("--gt", gt_file, "--detections", tmp_path / "dt.json", "--iou_type", "keypoints")
    assert bad_type.returncode == 2 and "keypoints" in bad_type.stderr


GOOD = {"image_id": 1, "category_id": 3, "bbox": [1, 1, 20, 20], "score": 0.9}


@pytest.mark.parametrize("iou_type, entries, problem", [
    ("bbox", [GOOD, 5], "detection #1 is not an object: 5"),
    ("bbox", [GOOD, {**GOOD, "score": "high"}], "detection #1: 'score' must be a finite number, got 'high'"),
    ("bbox", [GOOD, {**GOOD, "bbox": [1, 2]}],
     "detection #1: 'bbox' must be 4 finite numbers [x, y, w, h], got [1, 2]"),
    ("bbox", [GOOD, {**GOOD, "image_id": [1]}], "detection #1: 'image_id' must be an integer, got [1] (list)"),
    ("bbox", [{**GOOD, "category_id": "3"}], "detection #0: 'category_id' must be an integer, got '3' (str)"),
    ("segm", [{**GOOD, "segmentation": 5}], "detection #0: 'segmentation' must be polygons or an RLE "
                                           "object with 'counts' and 'size', got 5"),
    ("segm", [{**GOOD, "segmentation": [[1, 2]]}],
     "detection #0: 'segmentation' must be polygons: lists of at least 3 finite (x, y) pairs"),
], ids=["not_an_object", "score_string", "short_bbox", "list_image_id", "string_category_id",
        "segmentation_number", "short_polygon"])
def test_malformed_detections_are_one_line_naming_the_entry(tmp_path, capsys, iou_type, entries, problem):
    """Issue 31 item 8: each of these was a TypeError / IndexError / pycocotools traceback
    (or, for a string category id, 'not in the ground truth categories [3, 9]')."""
    gt = write_dataset(tmp_path, [(1, 64, 48)], [ann(1, 1, 3, [1, 1, 20, 20])])
    detections = tmp_path / "dt.json"
    detections.write_text(json.dumps(entries))
    assert evaluate.main(["--gt", str(gt), "--detections", str(detections), "--iou_type", iou_type]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {detections}: {problem}"]
