"""Issue 24 through the launcher: few runs, each checked for several items.

* Run A (``torchrun``, 2 ranks): Mask R-CNN under ZeRO-3 on a COCO-layout dataset whose
  images drawn by rank 1 carry no annotation (``data.filter_empty: false``), so rank 1's
  micro-batches have no foreground RoI while rank 0's have (item 2: it used to hang); 3
  steps, checkpoints at steps 2 and 3, a final evaluation. Its console is read for the
  end-of-run lines (item 8).
* Run B resumes run A from step 2, which is not its newest checkpoint, with
  ``keep_checkpoints: 1`` (item 1): the abandoned step 3 is moved aside with one
  ``warning:`` line, the checkpoint resumed from survives the pruning, and ``--resume auto``
  then picks this run's step 3, not the abandoned one.
* Run C (``torchrun``, 2 ranks, RetinaNet): one image rank 1 draws at step 2 has
  an intact header but truncated pixels, so rank 1 dies mid-run (item 6: the console ends
  with that rank's one ``error:`` line, no rank's traceback); ``agvm.start_step`` lies beyond the
  run (item 3: one ``warning:`` naming it).
* Run D (``python launch/train.py``, 1 rank): the quickstart file, shortened, runs on one
  rank (item 5: it used to exit 2), AGVM with the ``micro`` split; its warmup outlasts the
  shortened run, which the launcher says (item 3).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from train_helpers import REPO, TINY, metrics, run_train, tail, write_config

pytestmark = pytest.mark.slow
HANG_S = 150


def _draws(n_images: int, rank: int, steps: range) -> list[int]:
    """Dataset indices ``rank`` trains on at ``steps`` (one image per micro-batch, 2 ranks, seed 0)."""
    from agvm_ds.train.sampler import StepSampler

    sampler = StepSampler(n_images, 2, rank, 1, 1, seed=0)
    return [i for mb in sampler.iter_micro_batches(steps.start, steps.stop) for i, _ in mb]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 + 2 images of 64 px; the images rank 1 draws in steps 0-2 have no annotation."""
    from agvm_ds.data.synthetic import generate

    root = tmp_path_factory.mktemp("data") / "shapes"
    generate(root, train=16, val=2, seed=0, size=64)
    ann = root / "annotations" / "instances_train.json"
    doc = json.loads(ann.read_text())
    ids = sorted(img["id"] for img in doc["images"])
    empty = {ids[i] for i in _draws(len(ids), 1, range(0, 3))}
    assert not empty & {ids[i] for i in _draws(len(ids), 0, range(0, 3))}
    assert {ids[i] for i in _draws(len(ids), 0, range(0, 3))} <= {a["image_id"] for a in doc["annotations"]}
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] not in empty]
    ann.write_text(json.dumps(doc))
    return root


def _mask_rcnn_zero3(data: Path) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    cfg["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    cfg["model"] = {"spec": "models/mask_rcnn_uninet_tiny.json", "num_classes": 6}
    cfg["data"] = {"root": str(data), "task": "instance", "filter_empty": False, "min_size": 64,
                   "max_size": 64, "flip_prob": 0.0}
    cfg["agvm"] = {"interval": 1, "start_step": 0}
    cfg["train"] = {"max_steps": 3, "warmup_steps": 0, "checkpoint_every": 2, "eval_at_end": True,
                    "plot": False}
    return cfg


@pytest.fixture(scope="module")
def run_a(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run_a")
    config = write_config(tmp / "mask_zero3.json", _mask_rcnn_zero3(data))
    proc = run_train(config, tmp / "out", timeout=HANG_S)
    return config, tmp / "out", proc


def test_zero3_mask_rcnn_with_a_rank_without_foreground_finishes(run_a):
    _, out, proc = run_a
    assert proc.returncode == 0, tail(proc)  # before: no result within HANG_S (a hang)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss_mask"] > 0 for r in rows)  # the mean over ranks: rank 0's foreground


def _own_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("[agvm-ds]")]


def test_the_run_ends_with_times_mu_ap_and_checkpoint_once(run_a):
    _, out, proc = run_a
    assert proc.returncode == 0, tail(proc)
    lines = _own_lines(proc.stdout)
    saved = [line for line in lines if line.startswith("[agvm-ds] checkpoint saved: ")]
    assert [Path(line.split(": ")[1].split(" (")[0]).name for line in saved] == ["step_0000002", "step_0000003"]
    assert all(re.search(r"\(\d+\.\d MiB, \d+\.\d s\)$", line) for line in saved), saved
    tail_lines = lines[-5:]
    assert re.fullmatch(r"\[agvm-ds\] done: 3 steps in \d+\.\d s of training \(\d+ ms/step\), "
                        r"\d+\.\d s since start", tail_lines[0]), lines
    assert re.fullmatch(r"\[agvm-ds\] final μ \(update at step 2\): backbone 1\.000 \(anchor\), "
                        r"neck \d\.\d{3}, rpn \d\.\d{3}, roi_box \d\.\d{3}, roi_mask \d\.\d{3}", tail_lines[1]), lines
    evaluation = json.loads((out / "eval.json").read_text())
    assert tail_lines[2] == f"[agvm-ds] eval at step 3: bbox_AP={evaluation['bbox_AP']:.4f}, " \
                            f"bbox_AP50={evaluation['bbox_AP50']:.4f}, bbox_AP75={evaluation['bbox_AP75']:.4f}, " \
                            f"segm_AP={evaluation['segm_AP']:.4f}, segm_AP50={evaluation['segm_AP50']:.4f}, " \
                            f"segm_AP75={evaluation['segm_AP75']:.4f}"
    assert sum("bbox_AP=" in line for line in lines) == 1  # AP once
    assert tail_lines[3] == f"[agvm-ds] checkpoint: {out / 'checkpoints' / 'step_0000003'}"
    assert tail_lines[4] == f"[agvm-ds] outputs in {out}"
    assert re.search(r"mu_roi_mask=\d\.\d\d", proc.stderr), proc.stderr[-2000:]  # the progress bar


def test_resuming_an_older_checkpoint_starts_a_new_timeline(run_a):
    from agvm_ds.train.checkpoint import complete_tags, resolve_resume

    config, out, first = run_a
    assert first.returncode == 0, tail(first)
    ckpt = out / "checkpoints"
    assert [s for s, _ in complete_tags(ckpt)] == [2, 3]
    old_marker = (ckpt / "step_0000003" / "agvm_ds_complete.json").read_text()
    before = time.time()
    proc = run_train(config, out, "--resume", str(ckpt / "step_0000002"),
                     "--override", "train.keep_checkpoints=1", "--override", "train.eval_at_end=false",
                     timeout=HANG_S)
    assert proc.returncode == 0, tail(proc)
    assert f"resumed from {ckpt / 'step_0000002'} at step 2" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step_0000002 is not the newest checkpoint" in warnings[0], proc.stderr
    abandoned = [d for d in ckpt.iterdir() if d.name.startswith("abandoned_")]
    assert len(abandoned) == 1 and f"({'step_0000003'}) moved to {abandoned[0]}/" in warnings[0]
    # the abandoned step 3 is kept as it was, out of --resume auto's and the pruning's way
    assert (abandoned[0] / "step_0000003" / "agvm_ds_complete.json").read_text() == old_marker
    # keep_checkpoints=1 keeps the new step 3 and, although older, the checkpoint resumed from
    assert [s for s, _ in complete_tags(ckpt)] == [2, 3]
    assert (ckpt / "step_0000003" / "agvm_ds_complete.json").stat().st_mtime >= before  # written by run B
    assert resolve_resume("auto", ckpt) == ckpt / "step_0000003"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_a_rank_dying_mid_run_has_the_last_word_and_a_run_without_agvm_steps_says_so(data, tmp_path):
    root = tmp_path / "shapes"
    shutil.copytree(data, root)
    doc = json.loads((root / "annotations" / "instances_train.json").read_text())
    images = sorted(doc["images"], key=lambda img: img["id"])
    target = images[_draws(len(images), 1, range(2, 3))[0]]
    png = root / "train" / target["file_name"]
    png.write_bytes(png.read_bytes()[:200])  # the header (size) is intact, the pixels are not
    cfg = copy.deepcopy(TINY)
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    cfg["data"] = {"root": str(root), "filter_empty": False, "min_size": 64, "max_size": 64}
    cfg["agvm"]["start_step"] = 99
    cfg["train"].update(max_steps=3, checkpoint_every=0, checkpoint_at_end=False)
    proc = run_train(write_config(tmp_path / "c.json", cfg), tmp_path / "out", timeout=HANG_S)
    assert proc.returncode != 0 and not getattr(proc, "timed_out", False), tail(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(png) in errors[0] and errors[0].endswith("(rank 1)"), tail(proc)
    ours = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "warning:", "[agvm-ds]"))]
    assert ours[-1] == errors[0], ours  # the failing rank's line comes last
    assert ours[-2].startswith("[agvm-ds] rank 0 stopped: another rank failed"), ours
    # no rank's traceback on the console (torchrun's own failure report is the launcher's)
    assert 'launch/train.py", line' not in proc.stderr + proc.stdout, tail(proc)
    # rank 0's collective traceback is in its log; gloo words the failure differently with
    # timing ("Connection closed by peer", or a wait on the remote worker that gives up)
    log0 = (tmp_path / "out" / "log_rank0.txt").read_text()
    assert "Traceback (most recent call last)" in log0 and ("gloo" in log0.lower() or "peer" in log0.lower()), log0[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: agvm.start_step")]
    assert len(warnings) == 1 and "99" in warnings[0] and "3 steps" in warnings[0], proc.stderr
    assert "AGVM never active" in proc.stdout


def test_the_quickstart_runs_on_one_rank(tmp_path):
    small = ["--override", "data.synthetic.train=32", "--override", "data.synthetic.val=8",
             "--override", "data.synthetic.workers=1", "--override", "train.max_steps=2",
             "--override", "train.eval_at_end=false", "--override", "train.checkpoint_at_end=false",
             "--override", "train.plot=false"]
    proc = run_train(REPO / "ds_configs" / "quickstart.json", tmp_path / "out", *small, launcher="python",
                     timeout=HANG_S)
    assert proc.returncode == 0, tail(proc)
    assert "global batch 16 = 8 x 2 x 1 ranks" in proc.stdout, proc.stdout
    record = json.loads((tmp_path / "out" / "config.json").read_text())
    # the run's record keeps the global and micro batch; the accumulation count follows the
    # world size it is reloaded at (issue 25)
    assert record["agvm"]["estimator"] == "auto" and "gradient_accumulation_steps" not in record
    assert (record["train_batch_size"], record["train_micro_batch_size_per_gpu"]) == (16, 8)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: train.warmup_steps: "), proc.stderr
