"""One image decoder for training, evaluation and prediction (issue 31 item 1): every PIL
mode to 8-bit RGB, 16-bit grayscale scaled (not clipped to white), a decompression bomb
refused in one line. References: a naive per-pixel loop for the 16-bit scaling, PIL's own
``convert("RGB")`` for the 8-bit modes (what the code did before, and still does)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from agvm_ds.data.coco import CocoDataset
from agvm_ds.data.errors import DatasetError
from agvm_ds.data.images import decode_image
from agvm_ds.inference.predictor import open_image
from agvm_ds.errors import ModelFileError


def _naive_16_to_8(values: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535) pixel by pixel, in Python floats."""
    out = np.zeros(values.shape, dtype=np.uint8)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            out[i, j] = int(round(float(values[i, j]) * 255.0 / 65535.0))
    return out


def _sixteen_bit_png(path, h=9, w=7):
    rng = np.random.default_rng(3)
    values = rng.integers(0, 65536, (h, w)).astype(np.uint16)
    values[0, :4] = (0, 128, 129, 65535)  # both ends and the rounding edge of the first step
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")  # what PIL makes of a 16-bit grayscale PNG
    return values


def test_sixteen_bit_grayscale_is_scaled_everywhere_it_is_decoded(tmp_path):
    values = _sixteen_bit_png(tmp_path / "g16.png")
    want = np.repeat(_naive_16_to_8(values)[:, :, None], 3, axis=2)
    assert (want[0, :4, 0] == (0, 0, 1, 255)).all()
    got = np.asarray(decode_image(tmp_path / "g16.png"))
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    # predict: from the file and from an already opened PIL image
    assert np.array_equal(np.asarray(open_image(tmp_path / "g16.png")), want)
    with Image.open(tmp_path / "g16.png") as im:
        assert np.array_equal(np.asarray(open_image(im)), want)
    # training and evaluation read images through their dataset
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "val").mkdir()
    (tmp_path / "g16.png").rename(tmp_path / "coco" / "val" / "g16.png")
    (tmp_path / "coco" / "annotations" / "instances_val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "g16.png", "width": 7, "height": 9}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3],
                         "area": 9, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}]}))
    for train in (True, False):
        dataset = CocoDataset(tmp_path / "coco", "val", train=train)
        assert np.array_equal(np.asarray(dataset.load_image(0)), want)
    # what the old convert("RGB") gave: everything above 255 white
    assert (np.asarray(Image.fromarray(values).convert("RGB")) == 255).mean() > 0.9


@pytest.mark.parametrize("mode", ["P", "CMYK", "RGBA", "LA", "L", "1"])
def test_eight_bit_modes_decode_as_pil_converts_them(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    image.save(path)
    with Image.open(path) as im:
        want = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(decode_image(path)), want)
    assert np.array_equal(np.asarray(open_image(path)), want)


def test_a_decompression_bomb_or_a_truncated_file_is_one_line(tmp_path, monkeypatch, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 x 1000: PIL's error
    with pytest.raises(DatasetError) as err:
        decode_image(tmp_path / "big.png")
    assert str(err.value).startswith(f"{tmp_path / 'big.png'}: refused, too many pixels")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelFileError, match="big.png: refused, too many pixels"):
        open_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1x and 2x: PIL only warns
    assert decode_image(tmp_path / "big.png").size == (64, 64)
    assert capsys.readouterr().err == ""
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "t.jpg", quality=90)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    truncated = r"t.jpg: cannot read image \((image file is truncated|Truncated File Read)"
    with pytest.raises(DatasetError, match=truncated):
        decode_image(tmp_path / "t.jpg")


def test_a_decompression_bomb_is_one_line_in_evaluate_and_predict(tmp_path, monkeypatch, capsys):
    """The header check that training and evaluation run before any decoding met PIL's
    DecompressionBombError (not an OSError) as a traceback; predict skips the image with one
    warning line, and says one error line when it was the only one."""
    import sys

    from test_after_training_inputs import REPO, _checkpoint
    from test_data_coco import ann, write_dataset

    sys.path.insert(0, str(REPO))
    from launch import evaluate, predict

    _, tag = _checkpoint(tmp_path)  # 6 classes
    coco = tmp_path / "coco"
    cats = [{"id": i, "name": f"c{i}"} for i in range(1, 7)]
    ann_file = write_dataset(coco, [(1, 64, 64), (2, 16, 16)], [ann(1, 1, 1, [1, 1, 20, 20])],
                             categories=cats, split="val")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: PIL's error
    big = coco / "val" / "0001.png"
    why = (f"{big}: refused, too many pixels (Image size (4096 pixels) exceeds limit of 2000 "
           "pixels, could be decompression bomb DOS attack.)")
    with pytest.raises(DatasetError) as err:  # what training builds, on every rank
        CocoDataset(coco, "val", train=True)
    assert str(err.value) == f"{why} (listed in {ann_file})"
    assert evaluate.main(["--model", str(tag), "--output_dir", str(tmp_path / "e"),
                          "--override", f"data.root={coco}", "--override", "data.val_split=val"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {why} (listed in {ann_file})"]
    # (beside good images it is skipped with that warning and the rest are predicted, as a
    # truncated JPEG is in test_after_training_io.py; alone, no forward pass is needed)
    assert predict.main(["--model", str(tag), "--images", str(big),
                         "--output_dir", str(tmp_path / "p1")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {why}; skipped", f"error: {big}: none of the 1 image(s) could be read (see the warnings)"]
