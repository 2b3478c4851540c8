"""Nothing lost, wherever a user points predict / export / evaluate / ``load_model`` (issue 31
items 1-2): outputs never overwrite inputs (md5 of every input before and after), renders
are named uniquely, a damaged image is one warning, every read is verified against the
checkpoint's marker (a flipped byte is refused in one line naming the file), and names
read from files stay inside their folder. The checkpoints are hand-made (a freshly built
tiny RetinaNet saved in DeepSpeed's ZeRO-0 layout with a marker as training writes it).
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
from PIL import Image

from test_after_training_inputs import _checkpoint, _one_error_line
from train_helpers import REPO

sys.path.insert(0, str(REPO))  # the launch/ scripts, imported as modules
from launch import evaluate, export, predict  # noqa: E402


def _md5s(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _images(folder, names, colour=(200, 30, 30), sizes=((48, 48), (96, 48), (48, 96))):
    """Solid images; at the checkpoint's 64 px they pad to 64x64, 32x64 and 64x32."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in zip(names, sizes):
        Image.new("RGB", size, colour).save(folder / name)
    return folder


def test_predict_never_writes_into_or_over_its_inputs(tmp_path, capsys):
    _, tag = _checkpoint(tmp_path)
    photos = _images(tmp_path / "photos", ["a.png", "b.png"])
    before = _md5s(tmp_path / "photos")
    for out in (photos, photos / "renders", tmp_path / "photos" / ".." / "photos"):
        assert predict.main(["--model", str(tag), "--images", str(photos),
                             "--output_dir", str(out)]) == 2
        assert "is inside the input folder" in _one_error_line(capsys)
    # a file named as input, the output folder being its folder
    assert predict.main(["--model", str(tag), "--images", str(photos / "a.png"),
                         "--output_dir", str(photos)]) == 2
    assert "holds the input" in _one_error_line(capsys)
    assert _md5s(tmp_path / "photos") == before  # nothing written, nothing changed
    # the folder above the inputs is fine: renders go into it, not into photos/
    assert predict.main(["--model", str(tag), "--images", str(photos),
                         "--output_dir", str(tmp_path)]) == 0
    assert (tmp_path / "a.png").is_file() and _md5s(tmp_path / "photos") == before


def test_same_names_in_two_folders_and_a_truncated_jpeg(tmp_path, capsys):
    _, tag = _checkpoint(tmp_path)
    first = _images(tmp_path / "A", ["a.png", "a_2.png"])
    second = _images(tmp_path / "B", ["a.png"], colour=(30, 30, 200), sizes=[(48, 96)])
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(second / "c.jpg", quality=95)
    data = (second / "c.jpg").read_bytes()
    (second / "c.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG: header intact
    before = {**_md5s(first), **{f"B/{k}": v for k, v in _md5s(second).items()}}
    out = tmp_path / "out"
    assert predict.main(["--model", str(tag), "--images", str(first), str(second),
                         "--output_dir", str(out), "--batch_size", "2"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"warning: {second / 'c.jpg'}: cannot read image")
    records = json.loads((out / "predictions.json").read_text())
    assert sorted(records) == sorted([str(first / "a.png"), "a_2.png", str(second / "a.png")])
    renders = sorted(p.name for p in out.glob("*.png"))
    assert renders == ["a.png", "a_2.png", "a_3.png"]  # three images, three renders
    # each render is drawn on its own image: A's are red underneath, B's blue
    blue = Image.open(out / "a_3.png").convert("RGB").getpixel((40, 90))
    assert blue[2] > blue[0], blue
    assert {**_md5s(first), **{f"B/{k}": v for k, v in _md5s(second).items()}} == before
    # images that pad to other sizes in one batch are each padded as alone: as at batch 1
    found = {}
    for batch in ("1", "3"):
        assert predict.main(["--model", str(tag), "--images", str(first), str(second),
                             "--output_dir", str(tmp_path / batch), "--batch_size", batch,
                             "--score_threshold", "0"]) == 0
        found[batch] = json.loads((tmp_path / batch / "predictions.json").read_text())
    assert found["3"] == found["1"] and sum(len(r) for r in found["1"].values()) > 0


def _flip_a_byte(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_or_a_missing_marker_is_refused_by_every_reader(tmp_path, capsys):
    import agvm_ds
    from agvm_ds.errors import CheckpointError

    _, tag = _checkpoint(tmp_path)
    states = tag / "mp_rank_00_model_states.pt"
    _flip_a_byte(states)
    images = _images(tmp_path / "photos", ["a.png"])
    want = f"error: {states}: checksum differs from the marker's (damaged)"
    assert evaluate.main(["--model", str(tag)]) == 2
    assert _one_error_line(capsys) == want
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "x")]) == 2
    assert _one_error_line(capsys) == want
    assert predict.main(["--model", str(tag), "--images", str(images),
                         "--output_dir", str(tmp_path / "p")]) == 2
    assert _one_error_line(capsys) == want
    with pytest.raises(CheckpointError) as err:
        agvm_ds.load_model(tag)
    assert f"error: {err.value}" == want
    assert not (tmp_path / "x").exists() and not (tmp_path / "p").exists()

    # no marker at all: refused, unless the user says so
    (tag / "agvm_ds_complete.json").unlink()
    _flip_a_byte(states)  # the original bytes again
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "x")]) == 2
    line = _one_error_line(capsys)
    assert f"{tag / 'agvm_ds_complete.json'}: missing" in line and "--no-verify" in line
    with pytest.raises(CheckpointError, match="agvm_ds_complete.json: missing"):
        agvm_ds.load_model(tag)
    assert agvm_ds.load_model(tag, verify=False).info["source"]["step"] == 3
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "x"),
                        "--no-verify"]) == 0
    # the export records its weights' CRC-32: a flipped byte there is refused too
    _flip_a_byte(tmp_path / "x" / "model.safetensors", at=0.9)
    assert predict.main(["--model", str(tmp_path / "x"), "--images", str(images),
                         "--output_dir", str(tmp_path / "p")]) == 2
    assert _one_error_line(capsys) == (f"error: {tmp_path / 'x' / 'model.safetensors'}: checksum "
                                       f"differs from the one {tmp_path / 'x' / 'config.json'} "
                                       "records (damaged)")


def test_export_refuses_a_run_folder_or_a_folder_it_did_not_write(tmp_path, capsys):
    _, tag = _checkpoint(tmp_path)
    run = tmp_path / "run"
    before = _md5s(run)
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(run)]) == 2
    assert "is a training run's folder" in _one_error_line(capsys)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "notes")]) == 2
    assert "not empty (holds todo.txt) and not an export" in _one_error_line(capsys)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"train_batch_size": 4}')
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "other")]) == 2
    assert "holds a config.json that is not an export" in _one_error_line(capsys)
    assert _md5s(run) == before and (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    # an export of its own is rewritten (exporting again, e.g. as bf16)
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "x")]) == 0
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "x"),
                        "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "x" / "config.json").read_text())["dtype"] == "bf16"


def test_an_output_dir_that_is_a_file_is_one_line_before_any_work(tmp_path, capsys):
    """Issue 31 item 8: evaluate met an --output_dir that is a file with mkdir's
    FileExistsError after the whole evaluation, and all three a folder below a file with
    NotADirectoryError; the file is never touched. (Training's refusal is
    tests/test_resume_policy.py's claim_run_folder check.)"""
    _, tag = _checkpoint(tmp_path)
    images = _images(tmp_path / "photos", ["a.png"])
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for out, problem in ((file, "is a file, not a folder"),
                         (file / "sub", f"{file} is a file, not a folder")):
        for main, argv in ((evaluate.main, ["--model", str(tag)]),
                           (predict.main, ["--model", str(tag), "--images", str(images)]),
                           (export.main, ["--checkpoint", str(tag)])):
            assert main(argv + ["--output_dir", str(out)]) == 2
            assert _one_error_line(capsys) == f"error: --output_dir {out}: {problem}"
    assert file.read_text() == "mine"


def test_names_read_from_files_stay_inside_their_folder(tmp_path, capsys):
    import agvm_ds
    from agvm_ds.errors import ConfigError

    _, tag = _checkpoint(tmp_path)
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "x")]) == 0
    config = tmp_path / "x" / "config.json"
    record = json.loads(config.read_text())
    (tmp_path / "outside.safetensors").write_bytes((tmp_path / "x" / "model.safetensors").read_bytes())
    for name, why in (("../outside.safetensors", "points outside"),
                      (str(tmp_path / "outside.safetensors"), "points outside")):
        config.write_text(json.dumps({**record, "weights": name}))
        with pytest.raises(ConfigError) as err:
            agvm_ds.load_model(tmp_path / "x", verify=False)
        assert str(err.value).startswith(f"{config}: entry {name!r} {why}"), err.value
    (tmp_path / "x" / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    config.write_text(json.dumps({**record, "weights": "link.safetensors"}))
    assert evaluate.main(["--model", str(tmp_path / "x")]) == 2
    assert "'link.safetensors' points outside" in _one_error_line(capsys)

    # a marker entry naming a device (a checksum of /dev/zero would never end), or a folder
    marker = tag / "agvm_ds_complete.json"
    good = json.loads(marker.read_text())
    for name, why in (("../../../../../../../../dev/zero", "points outside"),
                      ("/dev/zero", "points outside")):
        marker.write_text(json.dumps({**good, "files": {**good["files"], name: {"size": 0}}}))
        assert export.main(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "y")]) == 2
        assert _one_error_line(capsys).startswith(f"error: {marker}: entry {name!r} {why}")
    (tag / "zero").symlink_to("/dev/zero")
    (tag / "sub").mkdir()
    for name in ("zero", "sub"):
        marker.write_text(json.dumps({**good, "files": {**good["files"], name: {"size": 0}}}))
        with pytest.raises(ConfigError, match=f"{marker}: entry '{name}'"):
            agvm_ds.load_model(tag)
    (tag / "zero").unlink()
    (tag / "sub").rmdir()
    marker.write_text(json.dumps({**good, "files": {}}))
    with pytest.raises(ConfigError, match="mp_rank_00_model_states.pt: not listed in"):
        agvm_ds.load_model(tag)


def test_resume_does_not_follow_a_marker_entry_out_of_its_checkpoint(tmp_path):
    """--resume's cheap check (sizes) meets the names before any byte is read: a device or a
    path out of the tag is refused by name (an explicit --resume) or skipped (auto)."""
    from agvm_ds.errors import CheckpointError
    from agvm_ds.train.checkpoint import resolve_resume

    _, tag = _checkpoint(tmp_path)
    marker = tag / "agvm_ds_complete.json"
    good = json.loads(marker.read_text())
    assert resolve_resume(str(tag), tag.parent) == tag
    (tag / "zero").symlink_to("/dev/zero")
    for name, why in (("/dev/zero", "points outside"), ("../../config.json", "points outside"),
                      ("zero", "points outside")):
        marker.write_text(json.dumps({**good, "files": {**good["files"], name: {"size": 0}}}))
        with pytest.raises(CheckpointError) as err:
            resolve_resume(str(tag), tag.parent)
        assert str(err.value).startswith(f"--resume {tag}: {marker}: entry {name!r} {why}")
        warned = []
        with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
            resolve_resume("auto", tag.parent, warn=warned.append)
        assert len(warned) == 1 and f"entry {name!r} {why}" in warned[0]


def test_evaluate_never_writes_its_results_into_a_run_a_checkpoint_or_an_export(tmp_path, capsys):
    """`--output_dir runs/X` replaced the run's own eval.json; a checkpoint folder got
    eval.json and predictions.json beside the files its marker lists. Refused before the model
    is read (the --model here does not even exist), nothing written."""
    from launch import evaluate

    for name in ("checkpoints", "metrics.jsonl", "agvm_ds_complete.json", "model.safetensors"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).mkdir() if name == "checkpoints" else (folder / name).write_text("{}")
        before = sorted(p.name for p in folder.iterdir())
        code = evaluate.main(["--model", str(tmp_path / "absent"), "--output_dir", str(folder)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(f"error: --output_dir {folder}: is ") and f"holds {name}" in err, err
        assert "\n" not in err and sorted(p.name for p in folder.iterdir()) == before
