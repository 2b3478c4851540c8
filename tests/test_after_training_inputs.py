"""Export / load_model / the three commands on small hand-made checkpoints: the round trip,
and the bad inputs of issue 25 item 5 (each refused with one line naming the file or tensor;
a pickle is refused without running it).

The checkpoint is a ZeRO-0-style DeepSpeed folder (``mp_rank_00_model_states.pt`` with the
``module`` state dict) beside a run ``config.json``, written with ``torch.save`` from a freshly
built network: no training, no DeepSpeed engine.
"""

from __future__ import annotations

import json
import os
import pickle
import sys

import pytest
import torch

from train_helpers import REPO

sys.path.insert(0, str(REPO))  # the launch/ scripts, imported as modules
from launch import evaluate, export, predict  # noqa: E402

SPEC = "models/retinanet_uninet_tiny.json"
#: random weights score below the default 0.05: keep a few boxes anyway, cheaply
OVERRIDES = {"head.score_thresh": 0.0, "head.topk_candidates": 50, "head.max_detections": 10}
RUN = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4,
       "optimizer": {"type": "SGD", "params": {"lr": 0.01}},
       "model": {"spec": SPEC, "num_classes": 6, "overrides": OVERRIDES},
       "data": {"synthetic": {"train": 16, "val": 8, "seed": 0, "size": 64},
                "min_size": 64, "max_size": 64}}


def _checkpoint(root, run=RUN, state=None):
    from agvm_ds.models import build_model

    torch.manual_seed(0)
    model = build_model(SPEC, num_classes=6, overrides=OVERRIDES)
    tag = root / "run" / "checkpoints" / "step_0000003"
    tag.mkdir(parents=True)
    (root / "run" / "config.json").write_text(json.dumps(run))
    torch.save({"module": model.state_dict() if state is None else state, "dp_world_size": 1,
                "global_steps": 3, "ds_config": {"zero_optimization": {"stage": 0}}},
               tag / "mp_rank_00_model_states.pt")
    write_marker(tag)  # what makes a checkpoints/ folder pick it, and what reads verify
    return model, tag


def write_marker(tag):
    """A completion marker as training writes it: every file of ``tag`` with its size and
    CRC-32 (zlib's, over the whole file), written by rank 0."""
    import zlib

    files = {p.name: {"size": p.stat().st_size, "crc32": zlib.crc32(p.read_bytes()), "rank": 0}
             for p in sorted(tag.iterdir()) if p.name != "agvm_ds_complete.json"}
    (tag / "agvm_ds_complete.json").write_text(json.dumps({"format": 2, "step": 3, "files": files}))


class _Planted:
    """Unpickling this runs ``os.mkdir(path)``: proof that a loader executed the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def _image_folder(root):
    from PIL import Image

    folder = root / "images"
    folder.mkdir()
    Image.new("RGB", (40, 48), (200, 30, 30)).save(folder / "red.png")
    return folder


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_export_round_trip_and_predict_from_a_checkpoint_or_an_export(tmp_path):
    import agvm_ds
    from safetensors.torch import load_file

    model, tag = _checkpoint(tmp_path)
    assert export.main(["--checkpoint", str(tag.parent), "--output_dir", str(tmp_path / "x")]) == 0
    saved = load_file(str(tmp_path / "x" / "model.safetensors"))
    reference = model.state_dict()
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) for k in reference)
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    assert config["class_names"] == ["circle", "square", "triangle", "star", "ring", "cross"]
    assert config["transform"]["min_size"] == 64 and config["source"]["step"] == 3
    assert config["model_spec"]["backbone"]["checkpoint"] is None

    image = torch.randint(0, 256, (48, 40, 3), dtype=torch.uint8).numpy()
    from_export = agvm_ds.load_model(tmp_path / "x").predict([image], score_threshold=0.0)
    from_checkpoint = agvm_ds.load_model(tag).predict(image, score_threshold=0.0)
    assert len(from_export) == len(from_checkpoint) == 1
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(from_export[0][key], from_checkpoint[0][key]), key
    boxes = from_export[0]["boxes"]  # in the 40 x 48 image's own pixels
    assert len(boxes) and float(boxes[:, 2].max()) <= 40 and float(boxes[:, 3].max()) <= 48

    bf16 = tmp_path / "x16"  # from the run folder itself, this time
    assert export.main(["--checkpoint", str(tmp_path / "run"), "--output_dir", str(bf16),
                        "--dtype", "bf16"]) == 0
    half = load_file(str(bf16 / "model.safetensors"))
    name = "backbone.stem.0.weight"
    assert half[name].dtype == torch.bfloat16 and torch.equal(half[name], reference[name].bfloat16())


def test_a_timm_backbone_exports_timm_key_names():
    import timm

    from agvm_ds.inference.model_dir import backbone_state
    from agvm_ds.models import build_model

    model = build_model("models/retinanet_resnet18.json", num_classes=3)
    own = backbone_state(model, model.state_dict())
    features = timm.create_model("resnet18", features_only=True, out_indices=(2, 3, 4))
    features.load_state_dict(own, strict=True)
    classifier = timm.create_model("resnet18")  # the full model: only its classifier is missing
    missing, unexpected = classifier.load_state_dict(own, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


def test_mismatched_tensors_name_the_first_tensor_and_both_shapes(tmp_path, capsys):
    from agvm_ds.models import build_model
    from safetensors.torch import save_file

    # the run says 5 classes, the weights were trained for 6
    run = json.loads(json.dumps(RUN))
    run["model"]["num_classes"] = 5
    model, tag = _checkpoint(tmp_path, run=run)
    spec_state = build_model(SPEC, num_classes=5).state_dict()
    first = next(k for k in spec_state if spec_state[k].shape != model.state_dict()[k].shape)
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "x")]) == 2
    line = _one_error_line(capsys)
    assert (f"tensor {first!r} has shape {list(model.state_dict()[first].shape)} but the model "
            f"spec needs {list(spec_state[first].shape)}") in line and str(tag) in line

    # an export whose safetensors file was swapped for one with a reshaped tensor
    _, good = _checkpoint(tmp_path / "ok")
    assert export.main(["--checkpoint", str(good), "--output_dir", str(tmp_path / "y")]) == 0
    state = dict(model.state_dict())
    bad = next(iter(state))  # the network's first tensor
    state[bad] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "y" / "model.safetensors"))
    # (its size and CRC-32 no longer match config.json: --no-verify reaches the tensor check)
    assert predict.main(["--model", str(tmp_path / "y"), "--images", str(_image_folder(tmp_path)),
                         "--output_dir", str(tmp_path / "p"), "--no-verify"]) == 2
    line = _one_error_line(capsys)
    assert f"tensor {bad!r} has shape [3, 3] but the model spec needs" in line
    assert str(tmp_path / "y" / "model.safetensors") in line


def test_missing_checkpoint_model_or_image_names_the_path(tmp_path, capsys):
    missing = tmp_path / "runs" / "nothing" / "checkpoints" / "step_0000001"
    assert export.main(["--checkpoint", str(missing), "--output_dir", str(tmp_path / "x")]) == 2
    assert str(missing) in _one_error_line(capsys)
    assert evaluate.main(["--model", str(missing)]) == 2
    assert str(missing) in _one_error_line(capsys)

    _, tag = _checkpoint(tmp_path)
    no_image = tmp_path / "photos" / "cat.jpg"
    assert predict.main(["--model", str(tag), "--images", str(no_image),
                         "--output_dir", str(tmp_path / "p")]) == 2
    assert f"error: {no_image}: no such image or folder" == _one_error_line(capsys)
    (tmp_path / "run" / "config.json").unlink()  # a checkpoint copied without its run
    assert predict.main(["--model", str(tag), "--images", str(_image_folder(tmp_path)),
                         "--output_dir", str(tmp_path / "p")]) == 2
    assert str(tmp_path / "run" / "config.json") in _one_error_line(capsys)


def test_pickled_weights_are_refused_without_running(tmp_path, capsys):
    ran = tmp_path / "code_ran"
    # an export whose model.safetensors is a pickle
    _, tag = _checkpoint(tmp_path)
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "x")]) == 0
    weights = tmp_path / "x" / "model.safetensors"
    weights.write_bytes(pickle.dumps(_Planted(ran)))
    # refused by the size config.json records; unverified, by its first bytes
    assert predict.main(["--model", str(tmp_path / "x"), "--images", str(_image_folder(tmp_path)),
                         "--output_dir", str(tmp_path / "p")]) == 2
    assert "(truncated or damaged)" in _one_error_line(capsys) and not ran.exists()
    assert predict.main(["--model", str(tmp_path / "x"), "--images", str(tmp_path / "images"),
                         "--output_dir", str(tmp_path / "p"), "--no-verify"]) == 2
    line = _one_error_line(capsys)
    assert f"{weights}: not a safetensors file" in line and not ran.exists()
    torch.save({"module": _Planted(ran)}, weights)  # torch's zip format, same refusal
    assert evaluate.main(["--model", str(tmp_path / "x"), "--no-verify"]) == 2
    assert "not a safetensors file" in _one_error_line(capsys) and not ran.exists()

    # a DeepSpeed model-states file with a planted object
    states = tag / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "planted": _Planted(ran)}, states)
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "y")]) == 2
    assert f"{states}: " in _one_error_line(capsys) and not ran.exists()  # the marker's size
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "y"),
                        "--no-verify"]) == 2
    line = _one_error_line(capsys)
    assert f"{states}: refused to load" in line and not ran.exists()


def test_zero3_partitions_are_gathered_whole_from_any_rank_count(tmp_path):
    """A hand-made ZeRO-3 folder of 3 ranks (bf16 file names, padded last pieces, two param
    groups): every parameter comes back whole, the buffers from rank 0's file."""
    import math
    from collections import OrderedDict

    from agvm_ds.errors import CheckpointError
    from agvm_ds.inference.deepspeed_files import read_weights

    torch.manual_seed(0)
    full = {"a.weight": torch.randn(5, 3), "a.bias": torch.randn(5), "b.weight": torch.randn(7)}
    groups, world = [["a.weight", "a.bias"], ["b.weight"]], 3
    tag = tmp_path / "step_0000007"
    tag.mkdir()
    for r in range(world):
        flats = []
        for group in groups:
            pieces = []
            for name in group:
                flat, part = full[name].reshape(-1), math.ceil(full[name].numel() / world)
                padded = torch.cat([flat, torch.zeros(part * world - flat.numel())])
                pieces.append(padded[r * part:(r + 1) * part])
            flats.append(torch.cat(pieces))
        module = {name: torch.empty(0) for name in full} | {"bn.running_mean": torch.arange(3.0)}
        torch.save({"module": module, "buffer_names": ["bn.running_mean"], "global_steps": 7,
                    "param_shapes": [OrderedDict((n, full[n].shape) for n in g) for g in groups]},
                   tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"partition_count": world, "fp32_flat_groups": flats}},
                   tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    write_marker(tag)
    state, info = read_weights(tag)
    assert info["zero_stage"] == 3 and info["world_size"] == world and info["step"] == 7
    assert state.keys() == full.keys() | {"bn.running_mean"}
    assert all(torch.equal(state[k], v) for k, v in full.items())
    assert torch.equal(state["bn.running_mean"], torch.arange(3.0))

    (tag / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="zero_pp_rank_2_mp_rank_00_optim_states.pt: missing"):
        read_weights(tag)


def test_a_dataset_with_other_classes_than_the_model_is_one_line(tmp_path, capsys):
    """Issue 31 item 8: evaluate on a val split with fewer classes than the model was a
    traceback from the results conversion; with more, labels silently scored as other
    ids. Training refuses either direction before the engine (train split against
    model.num_classes, val split against the train split)."""
    from test_data_coco import ann, write_dataset

    from agvm_ds.config.run import load_run_config
    from agvm_ds.errors import ConfigError
    from agvm_ds.train.build import build_datasets, build_model

    _, tag = _checkpoint(tmp_path)  # 6 classes
    coco = tmp_path / "coco"
    ann_file = coco / "annotations" / "instances_val.json"
    for count in (2, 8):
        cats = [{"id": i, "name": f"c{i}"} for i in range(1, count + 1)]
        write_dataset(coco, [(1, 64, 64)], [ann(1, 1, 1, [1, 1, 20, 20])], categories=cats, split="val")
        assert evaluate.main(["--model", str(tag), "--output_dir", str(tmp_path / "e"),
                              "--override", f"data.root={coco}", "--override", "data.val_split=val"]) == 2
        assert _one_error_line(capsys) == (
            f"error: {ann_file}: the dataset has {count} classes but the model {tag} has 6 "
            "(model.num_classes); evaluate it on a dataset with its classes (--override data.root=...)")
    assert not (tmp_path / "e").exists()

    # training: the train split (6 classes here) against the val split (8)
    six = [{"id": i, "name": f"c{i}"} for i in range(1, 7)]
    write_dataset(coco, [(1, 64, 64)], [ann(1, 1, 1, [1, 1, 20, 20])], categories=six, split="train")
    config = tmp_path / "run.json"
    data = {"root": str(coco), "train_split": "train", "val_split": "val", "min_size": 64, "max_size": 64}
    config.write_text(json.dumps({**RUN, "train": {"max_steps": 1}, "data": data}))
    run = load_run_config(config, [], world_size=1)
    with pytest.raises(ConfigError) as err:
        build_datasets(run)
    assert str(err.value) == (f"{ann_file}: the val split has 8 classes but the train split "
                              f"({coco / 'annotations' / 'instances_train.json'}) has 6")
    train, _ = build_datasets(run, need_val=False)
    run = load_run_config(config, ["model.num_classes=7"], world_size=1)
    with pytest.raises(ConfigError, match="^model.num_classes: 7 but the dataset has 6 classes$"):
        build_model(run, train.num_classes)


@pytest.mark.parametrize("case, problem", [
    ("no_class_names", "class_names: Field required"),
    ("string_transform_size", "transform.min_size: Value error, must be a positive integer or a "
                              "non-empty list of them, got 'big'"),
    ("unknown_key", "num_clases: unknown key (did you mean 'num_classes'?)"),
    ("short_category_ids", "category_ids: 1 entries but num_classes is 6"),
    ("bad_run_data", "run.data.min_sise: unknown key (did you mean 'min_size'?)"),
])
def test_a_bad_export_config_is_one_line_naming_the_key(tmp_path, capsys, case, problem):
    """Issue 31 item 8: a hand-edited export config.json was a KeyError / TypeError inside
    predict, or 3-7 lines of raw pydantic from evaluate; now load_model, predict and
    evaluate each say one line naming the file and the key."""
    import agvm_ds
    from agvm_ds.errors import ModelFileError

    _, tag = _checkpoint(tmp_path)
    export_dir = tmp_path / "x"
    assert export.main(["--checkpoint", str(tag), "--output_dir", str(export_dir)]) == 0
    capsys.readouterr()
    config = export_dir / "config.json"
    record = json.loads(config.read_text())
    if case == "no_class_names":
        del record["class_names"]
    elif case == "string_transform_size":
        record["transform"]["min_size"] = "big"
    elif case == "unknown_key":
        record["num_clases"] = 6
    elif case == "short_category_ids":
        record["category_ids"] = [1]
    else:
        record["run"]["data"]["min_sise"] = 64
    config.write_text(json.dumps(record))
    want = f"error: {config}: {problem}"
    assert evaluate.main(["--model", str(export_dir)]) == 2
    assert _one_error_line(capsys) == want
    if case == "bad_run_data":  # only evaluation reads the run's data section; a checkpoint's
        run_file = tmp_path / "run" / "config.json"  # run config.json is read by every reader
        run_file.write_text(json.dumps({**RUN, "data": {**RUN["data"], "min_sise": 64}}))
        assert evaluate.main(["--model", str(tag)]) == 2
        assert _one_error_line(capsys) == (f"error: {run_file}: invalid model/data section "
                                           "(data.min_sise: unknown key (did you mean 'min_size'?))")
        return
    assert predict.main(["--model", str(export_dir), "--images", str(_image_folder(tmp_path)),
                         "--output_dir", str(tmp_path / "p")]) == 2
    assert _one_error_line(capsys) == want
    with pytest.raises(ModelFileError) as err:
        agvm_ds.load_model(export_dir)
    assert f"error: {err.value}" == want
