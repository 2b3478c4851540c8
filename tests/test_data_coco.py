"""COCO-format datasets: targets against hand-made data, and every bad-data path."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agvm_ds.data.coco import CocoDataset
from agvm_ds.data.errors import DatasetError
from agvm_ds.data.semantic import SemanticSegDataset
from agvm_ds.data.transforms import Transform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the launch/ scripts, imported as modules


def write_dataset(root: Path, images, annotations, categories=None, split="train") -> Path:
    """A tiny COCO layout by hand: ``images`` is a list of (id, w, h)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    infos = []
    for image_id, w, h in images:
        name = f"{image_id:04d}.png"
        pixels = np.full((h, w, 3), image_id * 10 % 256, dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name)
        infos.append({"id": image_id, "file_name": name, "width": w, "height": h})
    doc = {"images": infos, "annotations": annotations,
           "categories": categories or [{"id": 3, "name": "a"}, {"id": 9, "name": "b"}]}
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(doc))
    return path


def ann(aid, image_id, cat, bbox, **kw):
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0,
            "area": bbox[2] * bbox[3], **kw}


def square_polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def test_targets_labels_and_instance_masks(tmp_path):
    # Image 1: polygon square + compressed RLE; image 2: uncompressed RLE.
    rle_mask = np.zeros((20, 30), dtype=np.uint8)
    rle_mask[5:9, 10:20] = 1
    from pycocotools import mask as mu
    rle = mu.encode(np.asfortranarray(rle_mask))
    rle["counts"] = rle["counts"].decode()
    counts, current, run = [], 0, 0  # uncompressed RLE by a plain loop: column-major, zeros first
    for value in rle_mask.reshape(-1, order="F"):
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    anns = [ann(1, 1, 9, [2, 3, 10, 6], segmentation=square_polygon(2, 3, 10, 6)),
            ann(2, 1, 3, [10, 5, 10, 4], segmentation=rle),
            ann(3, 2, 3, [10, 5, 10, 4], segmentation={"size": [20, 30], "counts": counts})]
    write_dataset(tmp_path, [(1, 30, 20), (2, 30, 20)], anns)
    ds = CocoDataset(tmp_path, "train", task="instance")
    assert ds.cat_ids == [3, 9] and ds.num_classes == 2 and ds.class_names == ["a", "b"]
    image, target = ds[0]
    assert image.shape == (3, 20, 30) and target["image_id"] == 1
    assert torch.equal(target["labels"], torch.tensor([1, 0]))
    assert torch.allclose(target["boxes"], torch.tensor([[2., 3., 12., 9.], [10., 5., 20., 9.]]))
    expected_square = np.zeros((20, 30), dtype=np.uint8)
    expected_square[3:9, 2:12] = 1  # COCO polygons cover [x, x+w) x [y, y+h)
    assert (target["masks"][0].numpy() == expected_square).all()
    assert (target["masks"][1].numpy() == rle_mask).all()
    assert (ds[1][1]["masks"][0].numpy() == rle_mask).all()
    assert target["orig_size"] == (20, 30) and target["scale_factor"] == 1.0
    # Normalization: constant pixel value 10 → (10/255 - mean) / std in every channel.
    expected = (10 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(image[:, 0, 0], expected, atol=1e-6)


def test_crowd_and_empty_images_are_skipped_in_training_with_a_log(tmp_path, caplog):
    anns = [ann(1, 1, 3, [0, 0, 5, 5]), ann(2, 1, 3, [5, 5, 5, 5], iscrowd=1),
            ann(3, 2, 3, [1, 1, 4, 4], iscrowd=1)]
    write_dataset(tmp_path, [(1, 16, 16), (2, 16, 16), (3, 16, 16)], anns)
    with caplog.at_level(logging.INFO, logger="agvm_ds.data.coco"):
        train = CocoDataset(tmp_path, "train", train=True)
    assert train.ids == [1]  # image 2 has only a crowd box, image 3 nothing
    assert len(train[0][1]["boxes"]) == 1  # the crowd box is no target
    assert "2 crowd annotation(s)" in caplog.text
    assert "skipped 2 training image(s)" in caplog.text
    val = CocoDataset(tmp_path, "train", train=False)
    assert val.ids == [1, 2, 3] and len(val[2][1]["boxes"]) == 0
    assert len(val.coco.anns) == 3  # evaluation still sees crowd regions


@pytest.mark.parametrize("bbox, problem", [([10, 2, 8, 4], "outside"), ([-3, 2, 4, 4], "outside"),
                                           ([2, 2, 0, 4], "zero area"), ([2, 2, 4, "x"], "4 finite")])
def test_invalid_boxes_raise_naming_file_and_annotation(tmp_path, bbox, problem):
    path = write_dataset(tmp_path, [(1, 12, 10)], [ann(1, 1, 3, [1, 1, 2, 2]), ann(7, 1, 3, bbox)])
    with pytest.raises(DatasetError) as err:
        CocoDataset(tmp_path, "train")
    msg = str(err.value)
    assert str(path) in msg and "annotation id 7" in msg and problem in msg


def test_invalid_boxes_can_be_skipped_with_a_warning(tmp_path, caplog):
    write_dataset(tmp_path, [(1, 12, 10)], [ann(1, 1, 3, [1, 1, 2, 2]), ann(7, 1, 3, [2, 2, 0, 4])])
    with caplog.at_level(logging.WARNING, logger="agvm_ds.data.coco"):
        ds = CocoDataset(tmp_path, "train", skip_invalid_boxes=True)
    assert len(ds[0][1]["boxes"]) == 1
    assert "skipped 1 annotation(s)" in caplog.text and "annotation id 7" in caplog.text


def test_box_within_rounding_tolerance_is_accepted(tmp_path):
    write_dataset(tmp_path, [(1, 12, 10)], [ann(1, 1, 3, [0.0, 0.0, 12.4, 10.3])])
    boxes = CocoDataset(tmp_path, "train")[0][1]["boxes"]
    assert torch.allclose(boxes, torch.tensor([[0., 0., 12., 10.]]))  # clipped to the image


def test_unknown_category_and_image(tmp_path):
    path = write_dataset(tmp_path, [(1, 12, 10)], [ann(4, 1, 5, [1, 1, 2, 2])])
    with pytest.raises(DatasetError, match=r"annotation id 4.*unknown category_id 5.*\[3, 9\]") as err:
        CocoDataset(tmp_path, "train")
    assert str(path) in str(err.value)
    write_dataset(tmp_path, [(1, 12, 10)], [ann(4, 2, 3, [1, 1, 2, 2])])
    with pytest.raises(DatasetError, match="image_id 2 is not in 'images'"):
        CocoDataset(tmp_path, "train")


def test_missing_and_malformed_annotation_files(tmp_path):
    with pytest.raises(DatasetError, match="instances_val.json: annotation file not found"):
        CocoDataset(tmp_path, "val")
    path = write_dataset(tmp_path, [(1, 12, 10)], [])
    path.write_text('{"images": [], "annotations": [,]}')
    with pytest.raises(DatasetError, match=r"instances_train.json: malformed JSON at line 1 column"):
        CocoDataset(tmp_path, "train")
    path.write_text('{"images": [], "annotations": []}')
    with pytest.raises(DatasetError, match=r"missing key\(s\) \['categories'\]"):
        CocoDataset(tmp_path, "train")


def test_missing_unreadable_and_wrong_size_images(tmp_path):
    write_dataset(tmp_path, [(1, 12, 10), (2, 12, 10)], [ann(1, 1, 3, [1, 1, 2, 2])])
    (tmp_path / "train" / "0002.png").unlink()
    with pytest.raises(DatasetError, match=r"train/0002.png: image file not found \(1 of 2"):
        CocoDataset(tmp_path, "train")
    ds = CocoDataset(tmp_path, "train", check_files=False)
    with pytest.raises(DatasetError, match="0002.png: image file not found"):
        ds[1]
    (tmp_path / "train" / "0002.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="0002.png: cannot read image"):
        ds[1]
    Image.new("RGB", (7, 7)).save(tmp_path / "train" / "0002.png")
    with pytest.raises(DatasetError, match="0002.png: image is 7x7 but .* says 12x10"):
        ds[1]


def test_instance_task_needs_segmentation(tmp_path):
    write_dataset(tmp_path, [(1, 12, 10)], [ann(1, 1, 3, [1, 1, 2, 2])])
    with pytest.raises(DatasetError, match="annotation id 1 .* has no segmentation"):
        CocoDataset(tmp_path, "train", task="instance")


def test_semantic_dataset_conventions_and_bad_labels(tmp_path):
    (tmp_path / "img" / "training").mkdir(parents=True)
    (tmp_path / "ann" / "training").mkdir(parents=True)
    labels = np.array([[0, 1, 2, 3], [3, 3, 0, 255]], dtype=np.uint8)
    Image.new("RGB", (4, 2)).save(tmp_path / "img" / "training" / "a_1.jpg")
    Image.fromarray(labels).save(tmp_path / "ann" / "training" / "a_1.png")
    kw = dict(image_dir="img/{split}", label_dir="ann/{split}")
    ds = SemanticSegDataset(tmp_path, "training", num_classes=4, **kw)
    assert ds.num_classes == 4 and ds.ids == [0] and ds.coco is None
    assert (ds[0][1]["sem_seg"].numpy() == labels).all()
    ade = SemanticSegDataset(tmp_path, "training", num_classes=3, reduce_zero_label=True, **kw)
    assert (ade.load_sem_seg(0) == [[255, 0, 1, 2], [2, 2, 255, 255]]).all()
    small = SemanticSegDataset(tmp_path, "training", num_classes=3, **kw)
    with pytest.raises(DatasetError, match=r"a_1.png: label value 3 is outside 0..2"):
        small[0]
    with pytest.raises(DatasetError, match="semantic_classes"):
        SemanticSegDataset(tmp_path, "training", **kw)


def test_resize_flip_keep_boxes_and_masks_aligned(tmp_path):
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[8:20, 6:30] = 1
    from pycocotools import mask as mu
    rle = mu.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    write_dataset(tmp_path, [(1, 60, 40)], [ann(1, 1, 3, [6, 8, 24, 12], segmentation=rle)])
    # Short side 40 → 80 would make the long side 120 > 100, so the long side caps at 100.
    ds = CocoDataset(tmp_path, "train", task="instance", transform=Transform(80, 100, flip_prob=1.0))
    image, t = ds[0]
    assert image.shape == (3, 67, 100) and t["image_size"] == (67, 100) and t["flipped"]
    assert t["scale_factor"] == pytest.approx(100 / 60)
    sx, sy = 100 / 60, 67 / 40
    expected = torch.tensor([[100 - 30 * sx, 8 * sy, 100 - 6 * sx, 20 * sy]])
    assert torch.allclose(t["boxes"], expected, atol=1e-4)
    ys, xs = torch.nonzero(t["masks"][0], as_tuple=True)
    mask_box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    assert torch.allclose(mask_box, t["boxes"], atol=1.0)


def test_missing_area_and_iscrowd_get_coco_defaults(tmp_path):
    from agvm_ds.evaluation import evaluate_coco

    write_dataset(tmp_path, [(1, 12, 10)], [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 5]}])
    ds = CocoDataset(tmp_path, "train")
    assert ds.coco.anns[1]["area"] == 20 and ds.coco.anns[1]["iscrowd"] == 0
    stats = evaluate_coco(ds.coco, [{"image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 5], "score": 1.0}])
    assert stats["bbox_AP"] == pytest.approx(1.0)


def test_image_memo_decodes_each_image_once_within_its_budget(tmp_path, monkeypatch):
    # three 12x10 RGB images = 360 bytes each; a 800-byte budget keeps the first two decoded
    write_dataset(tmp_path, [(1, 12, 10), (2, 12, 10), (3, 12, 10)],
                  [ann(i, i, 3, [1, 1, 4, 4]) for i in (1, 2, 3)])
    plain = CocoDataset(tmp_path, "train", train=True)
    memo = CocoDataset(tmp_path, "train", train=True, image_memo_bytes=800)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(Path(path).name)
                        or real_open(path, *a, **k))
    for _epoch in range(3):
        for i in range(3):
            a, b = plain[i], memo[i]
            torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
            torch.testing.assert_close(a[1]["boxes"], b[1]["boxes"], rtol=0, atol=0)
    # the plain dataset opens every file every epoch; the memo only the third after epoch 1
    assert sorted(opened) == sorted(["0001.png", "0002.png", "0003.png"] * 3
                                    + ["0001.png", "0002.png", "0003.png"] + ["0003.png"] * 2)
    assert memo._memo.used == 720 and len(memo._memo) == 2
    # a file damaged after its first load is still served from memory; the unmemoized one fails
    (tmp_path / "train" / "0001.png").write_bytes(b"not a png")
    torch.testing.assert_close(memo[0][0], plain.transform(Image.new("RGB", (12, 10), (10,) * 3),
                                                           plain.load_target(0))[0])
    with pytest.raises(DatasetError, match="0001.png: cannot read image"):
        plain[0]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("case, problem", [
    ("width_string", "image 1 (0001.png): 'width' must be a positive integer, got '12' (str)"),
    ("image_number", "'images' entry #1 is not an object: 7"),
    ("image_string", "'images' entry #1 is not an object: 'b.png'"),
    ("mixed_category_ids", "'categories' entry #1 ('b'): 'id' must be an integer (COCO ids are), "
                           "got '9' (str)"),
    ("annotation_category_string", "'annotations' entry #0: 'category_id' must be an integer "
                                   "(COCO ids are), got '3' (str)"),
], ids=lambda value: value if " " not in value else "")
def test_wrongly_typed_entries_are_one_line_through_the_evaluate_cli(tmp_path, capsys, case, problem):
    """Issue 31 item 8: each was a bare TypeError traceback (or, for a string category id
    in an annotation, an 'unknown category_id 3' beside ids [3, 9])."""
    from launch import evaluate

    path = write_dataset(tmp_path, [(1, 12, 10)], [ann(1, 1, 3, [1, 1, 2, 2])])
    doc = json.loads(path.read_text())
    if case == "width_string":
        doc["images"][0]["width"] = "12"
    elif case == "image_number":
        doc["images"].append(7)
    elif case == "image_string":
        doc["images"].append("b.png")
    elif case == "mixed_category_ids":
        doc["categories"][1]["id"] = "9"
    else:
        doc["annotations"][0]["category_id"] = "3"
    path.write_text(json.dumps(doc))
    detections = tmp_path / "dt.json"
    detections.write_text("[]")
    assert evaluate.main(["--gt", str(path), "--detections", str(detections)]) == 2
    assert _one_error_line(capsys) == f"error: {path}: {problem}"
