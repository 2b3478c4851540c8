"""``launch/partition.py``: the 1B config's report, memory arithmetic, and error handling."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import agvm_ds  # noqa: F401
from agvm_ds.models import build_model
from agvm_ds.report import optimizer_state_bytes, partition_report, zero_memory

REPO = Path(__file__).resolve().parents[1]
CONFIG_1B = REPO / "ds_configs" / "maskrcnn_uninet_1b_bs960.json"


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "launch" / "partition.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _main(capsys, *args):
    """Run the CLI's ``main`` in-process (cheaper than a subprocess): (code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("partition_cli", REPO / "launch" / "partition.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_1b_config_report_json():
    start = time.time()
    proc = _run("--deepspeed_config", str(CONFIG_1B), "--world_size", "480", "--json")
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed <= 60, elapsed
    report = json.loads(proc.stdout)
    total = report["total_params"]
    assert 0.9e9 <= total <= 1.2e9
    assert len(report["modules"]) >= 4 and list(report["modules"])[0] == "backbone"
    assert report["unassigned_params"] == 0
    assert sum(m["params"] for m in report["modules"].values()) == total
    assert report["world_size"] == 480 and report["zero_stage"] == 3 and report["precision"] == "bf16"
    # decay / no-decay groups per module, counts adding up to the module's
    for m in report["modules"].values():
        assert len(m["groups"]) == 2 and sum(g["params"] for g in m["groups"]) == m["params"]
        assert sorted(g["weight_decay"] for g in m["groups"]) == [0.0, 0.05]
    z3 = report["memory_per_rank_bytes"]["zero3"]
    # bf16 AdamW: 2 (param) + 2 (grad) + 4 (fp32 master) + 8 (moments) bytes, all / 480
    assert z3["total"] == pytest.approx(total * 16 / 480)
    z0 = report["memory_per_rank_bytes"]["zero0"]
    assert z0["total"] == pytest.approx(total * 16)


def test_text_report_and_default_world_size(capsys):
    code, out, err = _main(capsys, "--deepspeed_config", str(CONFIG_1B))
    assert code == 0, err
    assert "480 ranks" in out  # 960 / (2 x 1)
    for name in ("backbone", "neck", "rpn", "roi_box", "roi_mask", "zero3"):
        assert name in out


def test_bad_configs_exit_2_without_traceback(tmp_path, capsys):
    cases = {
        "nomodel.json": ({"train_batch_size": 2}, "model"),
        "badspec.json": ({"model": {"spec": "models/missing.json", "num_classes": 3}}, "model.spec"),
        "badkey.json": ({"model": {"spec": "models/retinanet_uninet_tiny.json", "num_classes": 3,
                                   "colour": 1}}, "model.colour"),
    }
    for name, (body, key) in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(body))
        code, out, err = _main(capsys, "--deepspeed_config", str(path))
        assert code == 2, (name, out, err)
        assert key in err and "Traceback" not in err
    # and as a real process: one line on stderr, no traceback
    proc = _run("--deepspeed_config", str(tmp_path / "badspec.json"))
    assert proc.returncode == 2 and "model.spec" in proc.stderr and "Traceback" not in proc.stderr


def test_report_flags_unassigned_parameters(tmp_path, capsys):
    spec = json.loads((REPO / "models" / "faster_rcnn_uninet_tiny.json").read_text())
    spec["modules"] = {"backbone": ["backbone"], "neck": ["neck"], "rpn": ["rpn"]}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": {"spec": str(spec_path), "num_classes": 3}}))
    code, out, _ = _main(capsys, "--deepspeed_config", str(cfg), "--json")
    assert code == 1
    report = json.loads(out)
    with torch.device("meta"):
        model = build_model("faster_rcnn_uninet_tiny", num_classes=3)
    assert report["unassigned_params"] == sum(p.numel() for p in model.roi_box.parameters())
    assert report["problems"]


def test_memory_arithmetic():
    assert optimizer_state_bytes({"type": "SGD", "params": {"momentum": 0.9}})[0] == 4
    assert optimizer_state_bytes({"type": "SGD", "params": {}})[0] == 0
    assert optimizer_state_bytes({"type": "AdamW"})[0] == 8
    assert optimizer_state_bytes({"type": "Lamb"})[0] == 8
    assert optimizer_state_bytes({"type": "Lars", "params": {"momentum": 0.9}})[0] == 4
    assert optimizer_state_bytes({"type": "Lars"})[0] == 0  # no momentum: no buffer (registry row)
    m = zero_memory(1000, 4, "fp32", 4)  # fp32 SGD-momentum: 4 + 4 + 4 bytes
    assert m["zero0"] == {"params": 4000, "grads": 4000, "optimizer": 4000, "total": 12000}
    assert m["zero1"]["optimizer"] == 1000 and m["zero1"]["grads"] == 4000
    assert m["zero2"]["grads"] == 1000 and m["zero2"]["params"] == 4000
    assert m["zero3"]["total"] == 3000
    m = zero_memory(1000, 2, "bf16", 8, grad_accum_fp32=True)
    assert m["zero0"]["grads"] == 4000 and m["zero0"]["optimizer"] == 12000
    with torch.device("meta"):
        model = build_model("retinanet_uninet_tiny")
    r = partition_report(model, {"optimizer": {"type": "SGD", "params": {"momentum": 0.9,
                                                                          "weight_decay": 1e-4}},
                                 "zero_optimization": {"stage": 2}}, 2)
    assert r["precision"] == "fp32" and r["zero_stage"] == 2
    assert r["memory_per_rank_bytes"]["zero2"]["total"] == pytest.approx(r["total_params"] * (4 + 8 / 2))
    assert len(r["param_groups"]) == 6 and {g["weight_decay"] for g in r["param_groups"]} == {0.0, 1e-4}


def test_agvm_update_step_bytes_by_hand():
    from agvm_ds.report import agvm_update_step_bytes

    ds = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 100}, "gradient_accumulation_steps": 1,
          "agvm": {}}
    # GAS 1 on 4 ranks: the ranks split. Bucket 2.25 x 100 (+1): a 100-element fill buffer
    # and a 125-element send buffer, fp32; the accumulator is 1000 / 4 fp32 elements.
    got = agvm_update_step_bytes(ds, num_params=1000, largest_param=50, world_size=4)
    assert got == {"estimator": "ranks", "accumulator": 1000.0, "stream_buffers": 900}
    # micro under ZeRO-2 (GAS 2) copies its snapshot: no stream buffers
    ds["gradient_accumulation_steps"] = 2
    assert agvm_update_step_bytes(ds, 1000, 50, 4)["stream_buffers"] == 0
    # a parameter larger than ZeRO's bucket sets the bucket (ZeRO's bucket holds it whole)
    ds["gradient_accumulation_steps"] = 1
    assert agvm_update_step_bytes(ds, 1000, 400, 4)["stream_buffers"] == 4 * (400 + 500)
    ds["agvm"] = {"enabled": False}
    assert agvm_update_step_bytes(ds, 1000, 50, 4) == {}
