"""The large-batch study (launch/study.py): its smallest cell end to end, and its arithmetic.

The end-to-end test trains the grid's smallest AGVM cell (batch 16 = 8 x 2 on one rank) for
a few steps through the real DeepSpeed launcher on a tiny benchmark, builds the report, and
checks that a second call reuses the finished cell. The unit tests check each cell's run
file against the paper's lr rule and the gap figure against a hand computation.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch import study  # noqa: E402
from launch.study_report import BEGIN, gap_lines, phi_ratios  # noqa: E402


def _base() -> dict:
    return json.loads(study.BASE_CONFIG.read_text())


def test_grid_is_the_issue_default():
    cells = study.grid()
    assert {c.batch for c in cells} == {16, 128, 512}
    assert {(c.optimizer, c.agvm) for c in cells} == {("sgd", False), ("sgd", True),
                                                      ("adamw", False), ("adamw", True)}
    for opt in ("sgd", "adamw"):
        for agvm in (False, True):
            seeds = [c.seed for c in cells if c.batch == 512 and c.optimizer == opt and c.agvm == agvm]
            assert len(seeds) >= 2
    assert len({c.name for c in cells}) == len(cells)


@pytest.mark.parametrize("name", ["sgd-plain-b16-s0", "adamw-agvm-b128-s0", "sgd-agvm-b512-s1"])
def test_cell_config_follows_the_paper_rule(name, tmp_path):
    from agvm_ds.config.run import load_run_config
    from agvm_ds.train.schedule import scaled_lr

    cell = {c.name: c for c in study.grid()}[name]
    cfg = study.cell_config(cell, _base(), [])
    assert cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] == cell.batch
    assert cfg["gradient_accumulation_steps"] >= 2  # the micro estimator needs two halves
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    run = load_run_config(path, world_size=1)  # the launcher's own validation accepts it
    base_lr = study.OPTIMIZERS[cell.optimizer][1]
    b = cell.batch
    expected = base_lr * b / 16 if b <= 128 else base_lr * 128 / 16 * math.sqrt(b / 128)
    assert scaled_lr(run.train.lr_scaling, b) == pytest.approx(expected, rel=1e-12)
    assert tuple(run.agvm.clamp) == ((0.5, 10.0) if cell.agvm else (1.0, 1.0))
    steps, warmup = study.schedule_steps(cfg, b)
    assert steps == math.ceil(cfg["train"]["epochs"] * 8000 / b)
    assert warmup == math.ceil(cfg["train"]["warmup_epochs"] * 8000 / b)


def test_gap_figure_against_hand_computation():
    def rec(opt, agvm, batch, seed, ap):
        return {"optimizer": opt, "agvm": agvm, "batch": batch, "seed": seed, "ap": ap}

    groups = {("sgd", False, 16): [rec("sgd", False, 16, 0, 0.50), rec("sgd", False, 16, 1, 0.40)],
              ("sgd", False, 512): [rec("sgd", False, 512, 0, 0.20), rec("sgd", False, 512, 1, 0.30)],
              ("sgd", True, 512): [rec("sgd", True, 512, 0, 0.35), rec("sgd", True, 512, 1, 0.30)]}
    lines = gap_lines(groups)
    row = next(line for line in lines if line.startswith("| sgd | 512"))
    # reference 0.45; seed 0: (0.35-0.20)/(0.45-0.20) = 0.6; seed 1: 0/(0.15) = 0
    assert "s0 0.60" in row and "s1 0.00" in row
    assert "| 0.30 |" in row  # the mean of the two seeds


def test_phi_ratio_is_a_median_after_warmup():
    series = {"backbone": {"step": [10, 20, 30, 40], "phi": [1.0, 0.8, 0.6, 0.9]},
              "head": {"step": [10, 20, 30, 40], "phi": [1.0, 0.2, 0.3, 0.3]}}
    r = phi_ratios(series, after_step=20)
    assert r["head"] == pytest.approx(3.0)  # median of 4, 2, 3
    assert r["backbone"] == pytest.approx(1.0)


def test_smallest_cell_end_to_end(tmp_path, capsys):
    out, doc = tmp_path / "cells", tmp_path / "large_batch.md"
    args = ["--out", str(out), "--doc", str(doc), "--cells", "sgd-agvm-b16-s0", "--jobs", "1",
            "--set", f"data.cache_dir={tmp_path / 'data'}", "--set", "data.synthetic.train=48",
            "--set", "data.synthetic.val=8", "--set", "train.epochs=2",
            "--set", "train.warmup_epochs=0.4", "--set", "agvm.interval=2",
            "--port", "29761"]
    assert study.main(args) == 0
    cell = out / "sgd-agvm-b16-s0"
    record = json.loads((cell / "study_cell.json").read_text())
    assert record["rc"] == 0 and record["steps"] == 6 and record["batch"] == 16
    ev = json.loads((cell / "run" / "eval.json").read_text())
    assert ev["step"] == 6 and 0.0 <= ev["bbox_AP"] <= 1.0
    rows = [json.loads(line) for line in (cell / "run" / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if r.get("agvm")]
    assert updates and all(math.isfinite(r["agvm_b_noise"]) for r in updates if r["agvm_b_noise"] is not None)
    assert {"backbone", "neck", "head"} <= set(updates[-1]["agvm"])
    text = doc.read_text()
    assert "| sgd | yes | 16 | 1 |" in text
    assert (tmp_path / "images" / "large_batch_phi.png").stat().st_size > 0
    # a hand-written reading outside the generated block survives a rebuild, and the
    # finished cell is reused rather than trained again
    doc.write_text("# mine\n\nreading kept\n\n" + text.split("# Large-batch study", 1)[1])
    capsys.readouterr()
    mtime = (cell / "run" / "metrics.jsonl").stat().st_mtime_ns
    assert study.main(args) == 0
    assert "sgd-agvm-b16-s0: reused" in capsys.readouterr().out
    assert (cell / "run" / "metrics.jsonl").stat().st_mtime_ns == mtime
    assert "reading kept" in doc.read_text() and doc.read_text().count(BEGIN) == 1


def test_full_grid_configs_validate(tmp_path):
    """--full (for a GPU) is never trained here: at least every one of its run files must
    pass the launcher's validation, LAMB and LARS included."""
    from agvm_ds.config.run import load_run_config

    cells = study.grid(full=True)
    assert {c.optimizer for c in cells} == {"sgd", "adamw", "lamb", "lars"}
    assert {c.batch for c in cells} == {16, 128, 512, 1024}
    for cell in {(c.optimizer, c.agvm, c.batch): c for c in cells}.values():
        path = tmp_path / f"{cell.name}.json"
        path.write_text(json.dumps(study.cell_config(cell, _base(), [])))
        load_run_config(path, world_size=1)
