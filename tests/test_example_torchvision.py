"""examples/torchvision_detector.py runs as documented: 2 ranks (torchrun), ZeRO-3, a few steps
on a small embedded benchmark; μ per module logged, a checkpoint written, COCO stats at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from agvm_ds.testing.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def test_torchvision_example_trains_checkpoints_and_evaluates(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "examples" / "torchvision_detector.py"), "--train_images", "16", "--val_images", "8",
           "--size", "64", "--batch", "2", "--steps", "3", "--warmup", "1", "--interval", "1", "--zero", "3",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    # its own process group, so a hung rank dies with the launcher on a timeout
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "AGVM modules (torchvision R-CNN" in stdout and "backbone, fpn, rpn, roi_box" in stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["mu"] == {} and rows[0]["agvm_step"] == -1  # warmup: AGVM starts after it
    assert [r["agvm_step"] for r in rows[1:]] == [1, 2]
    assert set(rows[-1]["mu"]) == {"backbone", "fpn", "rpn", "roi_box"} and rows[-1]["mu"]["backbone"] == 1.0
    assert any(abs(v - 1) > 1e-3 for v in rows[-1]["mu"].values())
    assert (out / "checkpoints" / "step_3").is_dir() and (out / "checkpoints" / "latest").read_text() == "step_3"
    stats = json.loads((out / "eval.json").read_text())
    assert stats["step"] == 3 and 0.0 <= stats["bbox_AP"] <= 1.0 and 0.0 <= stats["bbox_AP50"] <= 1.0
