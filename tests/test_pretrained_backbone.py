"""The shipped pretrained UniNet-tiny (bench/pretrain_backbone.py): its hash is the sidecar's, it
loads through model.backbone_checkpoint with no missing or unexpected key, and a short run of the
script is deterministic (two runs write identical bytes, and training moved the weights)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from agvm_ds.config import parse_section
from agvm_ds.config.model import ModelConfig
from agvm_ds.models import build_model

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "models" / "pretrained" / "uninet_tiny_shapes.safetensors"


def _script():
    spec = importlib.util.spec_from_file_location("pretrain_backbone", REPO / "bench" / "pretrain_backbone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_weights_hash_and_load():
    sidecar = json.loads(Path(str(WEIGHTS) + ".json").read_text())
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == sidecar["sha256"]
    assert sidecar["command"].startswith("python bench/pretrain_backbone.py ")
    assert WEIGHTS.stat().st_size <= 5 * 2**20
    state = load_file(str(WEIGHTS))
    for spec, num_classes in [("retinanet_uninet_tiny", 6), ("faster_rcnn_uninet_tiny", 6)]:
        cfg = parse_section(ModelConfig, {"spec": spec, "num_classes": num_classes,
                                          "backbone_checkpoint": str(WEIGHTS)}, "model")
        report = build_model(cfg).backbone.weights_report
        print(report.line())
        assert (report.missing, report.unexpected, report.strip) == ([], [], "")
        assert report.loaded == report.total > 0
    model = build_model("retinanet_uninet_tiny", overrides={"backbone.checkpoint": str(WEIGHTS)})
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_short_run_is_deterministic(tmp_path):
    script = _script()
    args = ["--train", "48", "--val", "16", "--size", "32", "--steps", "20", "--batch", "8", "--seed", "3"]
    digests = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        assert script.main(args + ["--out", str(out)]) == 0
        sidecar = json.loads(Path(str(out) + ".json").read_text())
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
        assert sidecar["sha256"] == digests[-1] and sidecar["steps"] == 20 and sidecar["seed"] == 3
        assert sidecar["load_report"].endswith("missing 0; unexpected 0")
    assert digests[0] == digests[1]
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:  # a map of 2+ entries is written
        assert f.metadata() == {"format": "pt"}                  # in hash order: bytes would vary
    torch.manual_seed(3)  # the script's initial weights: training must have changed them
    initial = script.build_backbone_of("uninet_tiny")[1].state_dict()
    trained = load_file(str(tmp_path / "a.safetensors"))
    assert set(trained) == set(initial)
    changed = [k for k in initial if initial[k].is_floating_point() and not torch.equal(initial[k], trained[k])]
    assert len(changed) > len(initial) // 2


def test_resnet18_weights_load_into_the_resnet18_detector(tmp_path):
    """--backbone resnet18 writes timm's features_only keys: the RetinaNet-R18 spec takes them all."""
    out = tmp_path / "r18.safetensors"
    args = ["--backbone", "resnet18", "--train", "16", "--val", "8", "--size", "32", "--steps", "2",
            "--batch", "8", "--out", str(out)]
    assert _script().main(args) == 0
    model = build_model("retinanet_resnet18", num_classes=6, overrides={"backbone.checkpoint": str(out)})
    report = model.backbone.weights_report
    assert (report.missing, report.unexpected, report.strip) == ([], [], "")
    state = load_file(str(out))
    for k, v in model.backbone.body.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_an_existing_out_is_refused_before_any_work(tmp_path, capsys):
    """The documented command names the shipped file: rerunning it must not overwrite it."""

    spec = importlib.util.spec_from_file_location("pretrain_backbone", REPO / "bench" / "pretrain_backbone.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shipped = REPO / "models" / "pretrained" / "uninet_tiny_shapes.safetensors"
    before = hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert mod.main(["--out", str(shipped), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out: {shipped}") and "\n" not in err
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == before
    (tmp_path / "w.safetensors.json").write_text("{}")  # a sidecar alone is another run's too
    assert mod.main(["--out", str(tmp_path / "w.safetensors"), "--steps", "1"]) == 2
    assert not (tmp_path / "w.safetensors").exists()
