"""What a resume may change (``RESUME_POLICY``), the folder lock, and ``--override`` into
``model.overrides`` (issue 31 items 3-5), without a training run.

* Every key of the run schema (DeepSpeed's top-level keys, every field of the ``agvm``,
  ``model``, ``data`` and ``train`` sections, nested ones included) has an entry, and every
  entry names a real key; the decisions the issue asks for (lr, seed, flip_prob, model,
  optimizer type) come out of two real loaded run files.
* ``--override model.overrides.head.num_convs=1`` on the quickstart keeps its two other
  overrides: the built spec equals the one from a file that lists all three.
* The lock: a live holder in another process (a real flock) refuses; a lock file whose pid
  is dead on this host is taken over with one warning; one naming a live pid on this host
  refuses even without a flock (file systems that do not enforce it).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from agvm_ds.errors import ConfigError
from train_helpers import REPO, TINY, write_config


def _schema_keys(model: type[BaseModel], prefix: str) -> list[str]:
    """Every dotted field path of a config model, nested config models walked."""
    keys = []
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}"
        keys.append(key)
        for arg in (info.annotation, *typing.get_args(info.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                keys += _schema_keys(arg, key)
    return keys


def _all_schema_keys() -> list[str]:
    from agvm_ds.config.agvm import AGVMConfig
    from agvm_ds.config.data import DataConfig
    from agvm_ds.config.model import ModelConfig
    from agvm_ds.config.train import TrainConfig
    from agvm_ds.zero.schema import discover

    keys = sorted({k.split(".")[0] for k in discover()})  # the installed DeepSpeed's top-level keys
    for section, model in (("agvm", AGVMConfig), ("model", ModelConfig), ("data", DataConfig),
                           ("train", TrainConfig)):
        keys += _schema_keys(model, section)
    return keys


def test_every_key_of_the_run_schema_is_classified_and_every_entry_is_a_key():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from agvm_ds.train.resume_policy import ALLOW, REFUSE, RESUME_POLICY, classify

    keys = _all_schema_keys()
    assert len(keys) > 100 and "train.grad_clip.end_step" in keys and "data.synthetic.seed" in keys
    unclassified = [k for k in keys if classify(k) not in (REFUSE, ALLOW)]
    assert unclassified == []
    known = (set(keys) | {"agvm", "model", "data", "train", "optimizer.params.lr"}
             | {f"zero_optimization.{f}" for f in DeepSpeedZeroConfig.model_fields})
    assert [entry for entry in RESUME_POLICY if entry not in known] == []
    assert set(RESUME_POLICY.values()) == {REFUSE, ALLOW}
    assert classify("some_unknown_key") is None  # diff_records refuses what it cannot classify


def _record(tmp_path, overrides):
    from agvm_ds.config.run import load_run_config
    from agvm_ds.train.resolve import record_before_data

    cfg = copy.deepcopy(TINY)
    cfg["model"]["overrides"] = {"head.num_convs": 2}
    run = load_run_config(write_config(tmp_path / "run.json", cfg), overrides, world_size=2)
    return record_before_data(run, tmp_path / "out")


def test_differences_are_split_into_refused_and_allowed(tmp_path):
    from agvm_ds.train.resume_policy import _MISSING, diff_records

    stored = _record(tmp_path, [])
    assert diff_records(stored, _record(tmp_path, [])) == ([], [])
    new = _record(tmp_path, ["optimizer.params.lr=0.04", "train.max_steps=30", "train.eval_every=5",
                             "train.seed=1", "data.flip_prob=0.0", "model.overrides.head.num_convs=1",
                             'optimizer={"type": "AdamW", "params": {"lr": 0.04}}', "agvm.momentum=0.5",
                             "data.num_workers=1", "stray_key=1"])
    refused, allowed = diff_records(stored, new)
    assert [k for k, *_ in allowed] == ["agvm.momentum", "data.num_workers", "optimizer.params.lr",
                                       "train.eval_every", "train.max_steps"]
    assert ("optimizer.params.lr", 0.02, 0.04) in allowed
    assert refused == [("data.flip_prob", 0.5, 0.0), ("model.overrides.head.num_convs", 2, 1),
                       ("optimizer.params.momentum", 0.9, _MISSING),
                       ("optimizer.params.weight_decay", 0.0001, _MISSING),
                       ("optimizer.type", "SGD", "AdamW"), ("stray_key", _MISSING, 1),
                       ("train.seed", 0, 1)]
    # the derived start step (null: the end of warmup) is not a change; 1 vs 1.0 is none either
    stored["agvm"]["start_step"], stored["_resolved"] = 7, {"warmup_steps": 7}
    stored["train"]["max_steps"] = 12.0
    assert diff_records(stored, _record(tmp_path, ["agvm.start_step=null"])) == ([], [])
    # but an explicit start step that becomes the end of warmup is
    stored["_resolved"]["warmup_steps"] = 2
    assert diff_records(stored, _record(tmp_path, ["agvm.start_step=null"])) == (
        [], [("agvm.start_step", 7, None)])
    # a field the schema gained after the run was saved is no change (its default is filled in)
    del stored["data"]["image_memo_mb"], stored["agvm"]["selfcheck"]
    assert diff_records(stored, _record(tmp_path, ["agvm.start_step=7"])) == ([], [])


def test_override_into_model_overrides_sets_one_dotted_key(tmp_path):
    from agvm_ds.config.run import load_run_config

    quick = REPO / "ds_configs" / "quickstart.json"
    run = load_run_config(quick, ["model.overrides.head.num_convs=1"])
    assert run.model.overrides == {"head.box_loss": "giou", "head.anchors.size_per_stride": 3.0,
                                   "head.num_convs": 1}
    # the reference: the same three keys written into the file itself
    raw = json.loads(quick.read_text())
    raw["model"]["overrides"]["head.num_convs"] = 1
    ref = load_run_config(write_config(tmp_path / "quickstart.json", raw))
    spec = run.model.model_spec()
    assert spec.model_dump() == ref.model.model_spec().model_dump()
    assert (spec.head.num_convs, spec.head.box_loss, spec.head.anchors.size_per_stride) == (1, "giou", 3.0)
    # the other paths are walked as before
    run = load_run_config(quick, ["train.grad_clip.max_norm=2", "optimizer.params.betas.1=0.9"])
    assert run.train.grad_clip.max_norm == 2
    assert run.deepspeed["optimizer"]["params"]["betas"] == [0.9, 0.9]


def _lock_record(path: Path) -> dict:
    return json.loads(path.read_text())


def test_a_live_holder_refuses_a_dead_one_is_taken_over(tmp_path):
    from agvm_ds.train.rundir import LOCK_NAME, _proc_start, acquire_lock

    lock = tmp_path / LOCK_NAME
    # another process holds the flock (what a running job's rank 0 does)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{\"pid\": %d, \"host\": \"h\", \"started\": \"t\"}' "
        "% os.getpid()); print('held', flush=True); time.sleep(60)"), str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as err:
            acquire_lock(tmp_path)
        assert str(err.value) == (f"{tmp_path} is in use by another run (pid {holder.pid} on h, started t; "
                                  f"lock file {lock}): wait for it to end, or choose another --output_dir")
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its file stays, naming a pid that no longer runs here
    warnings = []
    mine = acquire_lock(tmp_path, warn=warnings.append)
    assert len(warnings) == 1 and f"pid {holder.pid} on h" in warnings[0] and "no longer running" in warnings[0]
    record = _lock_record(lock)
    assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
    mine.release()
    assert not lock.exists()

    # no flock held (a file system that does not enforce it), but the named pid runs here
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for _ in range(50):  # /proc/<pid>/stat names sleep once exec is done
            if _proc_start(sleeper.pid):
                break
            time.sleep(0.01)
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "s",
                                    "pid_start": _proc_start(sleeper.pid)}))
        with pytest.raises(ConfigError, match=f"is in use by another run \\(pid {sleeper.pid} on "):
            acquire_lock(tmp_path)
        # the same pid number, but another process (a reused pid): stale
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "s",
                                    "pid_start": "1"}))
        warnings = []
        acquire_lock(tmp_path, warn=warnings.append).release()
        assert len(warnings) == 1 and "no longer running" in warnings[0]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_checkpoint_of_another_run_does_not_continue_over_a_third(tmp_path):
    from agvm_ds.errors import CheckpointError
    from agvm_ds.config.run import load_run_config
    from agvm_ds.train.resume_policy import check_resume_config

    tag = tmp_path / "one" / "checkpoints" / "step_0000002"
    tag.mkdir(parents=True)
    run = load_run_config(write_config(tmp_path / "run.json", TINY), ["optimizer.params.lr=0.04"], world_size=2)
    from agvm_ds.train.resolve import record_before_data

    stored = load_run_config(write_config(tmp_path / "stored.json", TINY), [], world_size=2)
    (tmp_path / "one" / "config.json").write_text(json.dumps(record_before_data(stored, tmp_path / "one")))
    # into a new folder: allowed (the elastic resume does this), the lr change reported
    fresh = tmp_path / "new"
    check = check_resume_config(run, fresh, tag, str(tag))
    assert check.lines() == ["resume: optimizer.params.lr 0.02 -> 0.04"] and not fresh.exists()
    # into a folder that holds another run: refused, that run's files untouched
    other = tmp_path / "two"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(CheckpointError) as err:
        check_resume_config(run, other, tag, str(tag))
    assert str(err.value) == (f"--resume {tag}: the checkpoint belongs to the run in {tmp_path / 'one'}, but "
                              f"--output_dir {other} holds another run (metrics.jsonl); continue it in "
                              f"{tmp_path / 'one'} or in a new --output_dir")
    assert (other / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_folder_that_is_not_a_run_is_never_written_or_moved(tmp_path):
    from agvm_ds.train.rundir import claim_run_folder

    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    (home / "log_rank0.txt").write_text("a refused run's log")  # logs alone are no run
    for resume, fresh in ((None, True), ("auto", False)):
        with pytest.raises(ConfigError) as err:
            claim_run_folder(home, resume, 0, fresh=fresh, refuse_used=True)
        assert str(err.value) == (f"--output_dir {home}: holds files that are not an agvm-ds run (notes.txt); "
                                  f"choose an empty or a new folder")
    assert sorted(p.name for p in home.iterdir()) == ["log_rank0.txt", "notes.txt"]  # no lock left
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        claim_run_folder(tmp_path / "file", None, 0, refuse_used=True)
    # an empty folder, or one with logs only: a fresh start, nothing moved
    folder = claim_run_folder(tmp_path / "logs_only", None, 0, fresh=True, refuse_used=True)
    assert folder.previous is None and (tmp_path / "logs_only" / "agvm_ds.lock").is_file()
    folder.release()
    assert list((tmp_path / "logs_only").iterdir()) == []
