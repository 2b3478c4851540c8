"""Issue 31 items 3 and 4 on a real 2-rank gloo run: a resume decided before anything is
written, one run per output folder.

One spawned 2-rank group trains the tiny RetinaNet for 2 steps (checkpoints at 1 and 2)
into ``A`` and then, on that run:

* resumes it with a changed ``model.overrides``, another optimizer, another ``train.seed``
  and another ``data.flip_prob``: each refused on both ranks with the same one-line
  ``CheckpointError`` (``same_on_every_rank``: the launcher prints it once) naming each key
  and both values; afterwards every file of ``A`` has the bytes it had (md5), no lock is
  left, and ``agvm_ds.load_model`` still loads the checkpoint to exactly its saved weights.
  Through ``launch/train.py``'s ``main`` the optimizer change is exit 2 on both ranks and
  rank 0's one ``error:`` line, before the process group is used;
* while rank 0 holds ``A`` (``claim_run_folder``), rank 1 - another process - tries to
  take it: refused, naming rank 0's pid;
* a fresh start in ``A`` (the launcher's policy) is refused, bytes unchanged; in a copy
  ``B``, ``--fresh`` moves the whole run into ``B/previous_<time>/`` (same bytes), and
  ``launch/evaluate.py`` and ``launch/export.py`` (this process, after the group) read it;
* last, through ``launch/train.py``'s ``main``: ``--resume auto`` with another lr, decay and
  length is accepted, each change printed once (rank 0), recorded in ``config.json``'s
  ``"_resumes"``, and step 3 trains at the new lr.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from agvm_ds.testing.distributed import run_distributed
from train_helpers import REPO, TINY, TRAIN, write_config

pytestmark = pytest.mark.slow

REFUSED = {
    "model": ["model.overrides.head.num_convs=1"],
    "optimizer": ['optimizer={"type": "AdamW", "params": {"lr": 0.02, "weight_decay": 0.0001}}'],
    "seed": ["train.seed=1"],
    "flip_prob": ["data.flip_prob=0.0"],
}
ALLOWED = ["optimizer.params.lr=0.2", "train.max_steps=3", "train.decay=none"]


def _md5s(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _load_launcher(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ranks(rank, world, root, config):
    import torch

    import agvm_ds
    from agvm_ds import collectives
    from agvm_ds.checkpoint_engine import safe_load
    from agvm_ds.errors import ConfigError
    from agvm_ds.config.run import load_run_config
    from agvm_ds.train.loop import train
    from agvm_ds.train.rundir import acquire_lock, claim_run_folder

    out, result = root / "A", {}
    assert train(load_run_config(config, [], world_size=world), out, None, rank, world) == 0
    (out / f"log_rank{rank}.txt").write_text("what the launcher's console logs\n")  # none here
    collectives.barrier()
    before = _md5s(out)

    result["refused"] = {}
    for name, overrides in REFUSED.items():
        run = load_run_config(config, overrides, world_size=world)
        with pytest.raises(ConfigError) as err:
            train(run, out, "auto", rank, world)
        assert err.value.same_on_every_rank, name
        result["refused"][name] = str(err.value)
    collectives.barrier()
    result["unchanged_after_refusals"] = _md5s(out) == before
    if rank == 0:  # the good checkpoint still loads (config.json two levels up says what it is)
        tag = out / "checkpoints" / "step_0000002"
        model = agvm_ds.load_model(tag)
        saved = safe_load(tag / "mp_rank_00_model_states.pt")["module"]
        result["loads"] = all(torch.equal(t, saved[k]) for k, t in model.state_dict().items()
                              if k in saved) and len(saved) > 20

    # a second writer while this job holds the folder: rank 1 is another process
    folder = claim_run_folder(out, "auto", rank)
    if rank == 1:
        with pytest.raises(ConfigError) as err:
            acquire_lock(out)
        result["second_writer"] = str(err.value)
    collectives.barrier()
    result["lock_pid"] = os.getpid() if rank == 0 else None
    folder.release()
    collectives.barrier()

    # a fresh start in the used folder (the launcher's policy), then --fresh in a copy
    with pytest.raises(ConfigError) as err:
        claim_run_folder(out, None, rank, refuse_used=True)
    result["fresh_refused"] = str(err.value)
    collectives.barrier()
    result["unchanged_after_fresh_refusal"] = _md5s(out) == before
    if rank == 0:
        shutil.copytree(out, root / "B")
    collectives.barrier()
    folder = claim_run_folder(root / "B", None, rank, fresh=True, refuse_used=True)
    result["previous"] = str(folder.previous)
    folder.release()
    collectives.barrier()

    launcher = _load_launcher(TRAIN, "agvm_launch_train")
    launcher.ERROR_GRACE_S = 0  # rank 1's wait for rank 0's line: no launcher to race here
    argv = ["--deepspeed_config", str(config), "--output_dir", str(out), "--resume", "auto"]

    def launch(overrides):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = launcher.main(argv + [a for o in overrides for a in ("--override", o)])
        return code, stdout.getvalue(), stderr.getvalue()

    # another optimizer through the launcher: refused before the process group is touched
    result["optimizer_launch"] = launch(REFUSED["optimizer"])
    collectives.barrier()
    result["unchanged_after_launch"] = _md5s(out) == before
    # last (it tears the process group down): an accepted resume through the launcher
    result["code"], result["stdout"], result["stderr"] = launch(ALLOWED)
    result["before"] = before
    return result


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_folder")
    cfg = copy.deepcopy(TINY)
    cfg["data"]["synthetic"].update(train=16, val=4)
    cfg["train"].update(max_steps=2, checkpoint_every=1)
    config = write_config(root / "tiny.json", cfg)
    results = run_distributed(_ranks, 2, root, config, timeout=600)
    return root, config, results


def test_a_resume_that_changes_the_model_optimizer_seed_or_data_is_refused_in_one_line(job):
    root, _, (r0, r1) = job
    assert r0["refused"] == r1["refused"]  # one verdict; the launcher prints rank 0's
    config = root / "A" / "config.json"
    head = f"--resume auto: the checkpoint's run ({config}) was trained with other settings, which a " \
           f"resume cannot change: "
    tail = (". A resume may change the lr, the schedule and its length, and the eval/checkpoint/log "
            "cadence; start a new run for the rest (--fresh, or another --output_dir)")
    assert r0["refused"] == {
        "model": head + "model.overrides.head.num_convs (not set) -> 1" + tail,
        "optimizer": head + 'optimizer.params.momentum 0.9 -> (not set), optimizer.type "SGD" -> "AdamW"' + tail,
        "seed": head + "train.seed 0 -> 1" + tail,
        "flip_prob": head + "data.flip_prob 0.5 -> 0.0" + tail,
    }
    assert all("\n" not in msg for msg in r0["refused"].values())
    assert r0["unchanged_after_refusals"] and r1["unchanged_after_refusals"]
    assert r0["loads"]
    # through launch/train.py: exit 2 on both ranks, rank 0's one error line is the console
    for result, lines in ((r0, [f"error: {r0['refused']['optimizer']}"]), (r1, [])):
        code, stdout, stderr = result["optimizer_launch"]
        assert code == 2 and (stdout + stderr).splitlines() == lines, (stdout, stderr)
        assert result["unchanged_after_launch"]


def test_a_second_writer_is_refused(job):
    root, _, (r0, r1) = job
    out = root / "A"
    assert r1["second_writer"].startswith(f"{out} is in use by another run (pid {r0['lock_pid']} on ")
    assert r1["second_writer"].endswith(f"; lock file {out / 'agvm_ds.lock'}): wait for it to end, "
                                        f"or choose another --output_dir")


def test_a_fresh_start_in_a_used_folder_is_refused_and_fresh_moves_the_whole_run(job, tmp_path):
    root, _, (r0, r1) = job
    out = root / "A"
    assert r0["fresh_refused"] == r1["fresh_refused"]
    assert r0["fresh_refused"].startswith(f"--output_dir {out}: holds a run (checkpoints, config.json, "
                                          f"metrics.jsonl); continue it with --resume auto")
    assert r0["unchanged_after_fresh_refusal"] and r1["unchanged_after_fresh_refusal"]

    previous = Path(r0["previous"])
    assert r1["previous"] == r0["previous"] and previous.parent == root / "B"
    assert previous.name.startswith("previous_")
    assert [p.name for p in (root / "B").iterdir()] == [previous.name]  # the whole run moved
    assert _md5s(previous) == r0["before"]  # unchanged, logs included
    assert any(name.startswith("log_rank") for name in r0["before"])

    tag = previous / "checkpoints" / "step_0000002"
    evaluate = _load_launcher(REPO / "launch" / "evaluate.py", "agvm_launch_evaluate").main
    assert evaluate(["--model", str(tag), "--output_dir", str(tmp_path / "eval")]) == 0
    stats = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert stats["step"] == 2 and "bbox_AP" in stats
    export = _load_launcher(REPO / "launch" / "export.py", "agvm_launch_export").main
    assert export(["--checkpoint", str(tag), "--output_dir", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_an_allowed_resume_is_printed_once_and_recorded(job):
    root, _, (r0, r1) = job
    out = root / "A"
    assert r0["code"] == 0 and r1["code"] == 0, r0["stderr"][-3000:]
    said = [line for line in r0["stdout"].splitlines() if line.startswith("[agvm-ds] resume: ")]
    assert said == ["[agvm-ds] resume: optimizer.params.lr 0.02 -> 0.2",
                    '[agvm-ds] resume: train.decay "step" -> "none"',
                    "[agvm-ds] resume: train.max_steps 2 -> 3"]
    assert "resume: " not in r1["stdout"] + r1["stderr"]
    assert not [line for line in r0["stderr"].splitlines() if line.startswith(("error:", "warning:"))]
    record = json.loads((out / "config.json").read_text())
    assert record["optimizer"]["params"]["lr"] == 0.2 and record["train"]["max_steps"] == 3
    (entry,) = record["_resumes"]
    assert entry["from"] == str(out / "checkpoints" / "step_0000002") and entry["step"] == 2
    assert entry["world_size"] == 2
    assert entry["changed"] == {"optimizer.params.lr": [0.02, 0.2], "train.decay": ["step", "none"],
                                "train.max_steps": [2, 3]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # warmup (2 steps) is over and decay is none: step 3 runs at the new lr itself
    assert rows[2]["lr"] == 0.2
    assert not (out / "agvm_ds.lock").exists()
