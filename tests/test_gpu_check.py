"""bench/gpu_check.sh refuses cleanly without a GPU; bench/gpu_check.py's CPU smoke mode runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env():
    e = dict(os.environ)
    e.update({"DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2",
              "TORCH_EXTENSIONS_DIR": e.get("TORCH_EXTENSIONS_DIR",
                                            str(REPO / ".cache" / "torch_extensions"))})
    return e


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_check_without_cuda_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "x.json")],
                          cwd=tmp_path, env={**_env(), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines
    assert not (tmp_path / "x.json").exists()


def test_gpu_check_cpu_smoke_mode(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu",
                           "--smoke", "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert [line.split(":")[0] for line in summary] == [
        "PASS statistics", "PASS zero_fp32", "PASS zero_bf16"], summary
    checks = json.loads(out.read_text())["checks"]
    stats = checks["statistics"]
    assert stats["fused_kernel"] and stats["gram_rel_vs_fused"] <= 1e-6
    assert abs(stats["cos_device"] - stats["cos_fused"]) <= 1e-6
    for name in ("zero_fp32", "zero_bf16"):
        res = checks[name]
        assert res["steps"] == 2 and res["agvm_updates"] >= 1, res
        assert set(res["final_loss"]) == {"0", "1", "2", "3"}  # every stage ran
    assert checks["zero_fp32"]["max_loss_rel_diff"] <= 1e-4
