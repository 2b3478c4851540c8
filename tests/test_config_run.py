"""The run-file loader and the launcher's handling of broken configs.

Unit tests of ``load_run_config`` (overrides, comments, batch keys, DeepSpeed sections),
validation of every file in ``ds_configs/``, and real ``launch/train.py`` invocations with
broken files: they must exit non-zero within seconds with one ``error:`` line naming the
key or the file, and no traceback.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import pytest

from agvm_ds.errors import ConfigError
from agvm_ds.config.files import apply_override, parse_override
from agvm_ds.config.inherit import read_run_file
from agvm_ds.config.run import load_run_config, validate_run_dict
from agvm_ds.zero.settings import resolve_batch
from agvm_ds.config.run import main as run_main
from train_helpers import REPO, TINY, run_train, tail, write_config


def _load(tmp_path, cfg, overrides=(), world_size=2):
    return load_run_config(write_config(tmp_path / "run.json", cfg), list(overrides), world_size)


def test_overrides_parse_json_then_string():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=1e-3") == (["a"], 1e-3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override('a={"x": [1, 2]}') == (["a"], {"x": [1, 2]})
    assert parse_override("a=AdamW") == (["a"], "AdamW")
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="key.path=value"):
            parse_override(bad)
    cfg = {"x": {"y": [1, 2]}, "s": 1}
    apply_override(cfg, "x.y.1=5")
    apply_override(cfg, "new.deep.key=7")
    assert cfg["x"]["y"] == [1, 5] and cfg["new"] == {"deep": {"key": 7}}
    with pytest.raises(ConfigError, match="s is not an object"):
        apply_override(cfg, "s.t=1")


def test_load_applies_overrides_and_strips_comments(tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg["train"]["_note"] = "comments are allowed in every section"
    cfg["zero_optimization"]["_why"] = "also inside DeepSpeed's own sections"
    run = _load(tmp_path, cfg, ["train.max_steps=30", "agvm.interval=5",
                                "optimizer.params.lr=0.1", "zero_optimization.stage=3"])
    assert run.train.max_steps == 30 and run.agvm.interval == 5 and run.zero_stage == 3
    assert run.deepspeed["optimizer"]["params"]["lr"] == 0.1
    assert "_why" not in run.deepspeed["zero_optimization"] and "_comment" not in run.deepspeed
    assert (run.micro_batch, run.grad_accum, run.global_batch) == (2, 2, 8)
    # DeepSpeed's sections only: agvm-ds's own are typed (the agvm section reaches
    # agvm_ds.initialize as an AGVMConfig, not as a dict)
    assert not {"agvm", "model", "data", "train"} & set(run.deepspeed)
    assert run.name == "run"


@pytest.mark.parametrize("given,world,expect", [
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4}, 2, (16, 4, 2)),
    ({"train_batch_size": 16, "gradient_accumulation_steps": 2}, 2, (16, 4, 2)),
    ({"train_batch_size": 16}, 4, (16, 4, 1)),
    ({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}, 2, (12, 3, 2)),
    ({"train_micro_batch_size_per_gpu": 3}, 2, (6, 3, 1)),
])
def test_batch_keys_are_completed(given, world, expect):
    ds = dict(given)
    assert resolve_batch(ds, world) == world
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == expect


@pytest.mark.parametrize("given,world,match", [
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2},
     2, r"train_batch_size \(16\) != train_micro_batch_size_per_gpu \(2\) x "
        r"gradient_accumulation_steps \(2\) x world size \(2\)"),
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}, 2, "not divisible"),
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}, None, "not a multiple"),
    ({"gradient_accumulation_steps": 2}, 2, "train_batch_size"),
    ({"train_batch_size": 0}, 2, "train_batch_size: must be a positive integer"),
    ({"train_micro_batch_size_per_gpu": "8"}, 2, "train_micro_batch_size_per_gpu"),
])
def test_inconsistent_batch_keys(given, world, match):
    with pytest.raises(ConfigError, match=match):
        resolve_batch(dict(given), world)


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c["train"].update(bogus=1), r"train\.bogus: unknown key"),
    (lambda c: c["agvm"].update(momentum=1.5), r"agvm\.momentum"),
    (lambda c: c["agvm"].update(estimator="halves"), r"agvm\.estimator"),
    (lambda c: c["data"].update(flip_prob=2), r"data\.flip_prob"),
    (lambda c: c["model"].update(spec="models/nope.json"), r"model\.spec"),
    (lambda c: c["train"].update(max_steps=-1), r"train\.max_steps"),
    (lambda c: c["zero_optimization"].update(stgae=2), r"zero_optimization\.stgae"),
    (lambda c: c.update(zero_optimisation={"stage": 1}), r"zero_optimisation.*zero_optimization"),
    (lambda c: c.pop("optimizer"), r"optimizer: the section is required"),
    (lambda c: c["optimizer"]["params"].update(lr="fast"), r"optimizer\.params\.lr"),
    (lambda c: c.update(scheduler={"type": "WarmupLR"}), r"scheduler"),
    (lambda c: c.update(gradient_clipping=1.0), r"gradient_clipping"),
    (lambda c: c.update(agvm=[1]), r"agvm: must be an object"),
])
def test_bad_sections_name_the_key(tmp_path, mutate, match):
    cfg = copy.deepcopy(TINY)
    mutate(cfg)
    with pytest.raises(ConfigError, match=match):
        _load(tmp_path, cfg)


def test_unknown_top_level_key_warns(tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg["my_extra_thing"] = 1
    assert any("my_extra_thing" in w for w in _load(tmp_path, cfg).warnings)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="missing.json: cannot read config file"):
        load_run_config(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_run_config(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": {"max_steps": 3,}}')
    with pytest.raises(ConfigError, match=r"bad.json:1:\d+: invalid JSON"):
        load_run_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="top level must be a JSON object"):
        load_run_config(bad)


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    """Each file parses and validates (its ``_base_`` chain resolved, as the launcher reads
    it); its batch keys imply a whole number of ranks."""
    raw = read_run_file(path)
    assert isinstance(raw.get("_comment"), (str, list)), f"{path.name}: needs a _comment"
    run = validate_run_dict(raw, path, world_size=None)
    if path.name == "quickstart.json":
        run = validate_run_dict(raw, path, world_size=2)
        assert run.global_batch == run.micro_batch * run.grad_accum * 2
    else:
        assert run.world_size and run.world_size >= 1, path.name
        # the batch keys pin the world size: launching on one rank more must be refused
        with pytest.raises(ConfigError, match="train_batch_size"):
            validate_run_dict(raw, path, world_size=run.world_size + 1)


# ------------------------------------------------------------------ the launcher itself
LAUNCH_CASES = {
    "unknown key": (lambda c: c["train"].update(bogsu=1), "train.bogsu"),
    "bad value": (lambda c: c["agvm"].update(interval=0), "agvm.interval"),
    "inconsistent batch": (lambda c: c.update(train_batch_size=7), "train_batch_size (7)"),
    # issue 24 item 4: before, the core refused NaN after the data and the model were built
    # (a ValueError traceback, exit 1)
    "NaN": (lambda c: c["agvm"].update(clamp=[0.5, float("nan")]), "agvm.clamp.1: must be a finite number"),
}


@pytest.mark.parametrize("case", sorted(LAUNCH_CASES))
def test_launcher_rejects_broken_config_fast(tmp_path, case):
    mutate, needle = LAUNCH_CASES[case]
    cfg = copy.deepcopy(TINY)
    mutate(cfg)
    path = write_config(tmp_path / "broken.json", cfg)
    start = time.monotonic()
    proc = run_train(path, tmp_path / "out", launcher="python", extra_env={"WORLD_SIZE": "2"},
                     timeout=60)
    assert proc.returncode == 2, tail(proc)
    assert time.monotonic() - start < 20
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


def test_launcher_unreadable_file_and_bad_resume(tmp_path):
    proc = run_train(tmp_path / "nope.json", tmp_path / "out", launcher="python", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: " in proc.stderr and "nope.json" in proc.stderr
    path = write_config(tmp_path / "ok.json")
    proc = run_train(path, tmp_path / "out", "--resume", str(tmp_path / "no_ckpt"),
                     launcher="python", timeout=60)
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr, tail(proc)
    assert "Traceback" not in proc.stderr


def test_a_rendezvous_port_in_use_is_one_line_saying_master_port(tmp_path):
    """Issue 31 item 8: rank 0 opens the rendezvous store on MASTER_PORT (what
    ``deepspeed --master_port P`` hands every rank); with P taken it was torch's 25-line
    DistNetworkError traceback (EADDRINUSE). Rank 0 of the real script, with P bound and
    listening by this test. (Through ``deepspeed --num_gpus 2 --master_port P`` the console
    shows the same single line, checked by hand: 30 s, too slow for the suite. torchrun's
    own agent binds the port itself and fails before any rank starts.)"""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        rank0 = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        proc = run_train(write_config(tmp_path / "ok.json"), tmp_path / "out", launcher="python",
                         extra_env=rank0, timeout=120)
    assert proc.returncode == 2, tail(proc)
    assert proc.stderr.splitlines() == [
        f"error: the rendezvous port {port} on 127.0.0.1 is already in use (another job, or one "
        "still exiting): pass the launcher a free port with --master_port"], tail(proc)
    assert not (tmp_path / "out").exists()  # refused before the run folder is claimed


@pytest.mark.slow
def test_deepspeed_launcher_exits_nonzero_on_broken_config(tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg["agvm"]["clamp"] = [2.0, 1.0]
    start = time.monotonic()
    proc = run_train(write_config(tmp_path / "b.json", cfg), tmp_path / "out",
                     launcher="deepspeed", timeout=120)
    assert proc.returncode != 0, tail(proc)
    assert time.monotonic() - start < 60
    assert "error: agvm.clamp" in proc.stderr and "Traceback" not in proc.stderr


def test_checking_a_file_never_imports_a_module_it_names(tmp_path, capsys, monkeypatch):
    # issue 31 item 6: a dotted optimizer class is imported only where it will train (the
    # launcher, initialize); the read-only check reports it unchecked and runs no code
    pkg = tmp_path / "site"
    pkg.mkdir()
    touched = tmp_path / "imported.txt"
    (pkg / "sideeffect_opt.py").write_text(
        "import pathlib, torch\n"
        f"pathlib.Path({str(touched)!r}).write_text('ran')\n"
        "class Opt(torch.optim.SGD):\n    agvm_elementwise = True\n")
    monkeypatch.syspath_prepend(str(pkg))
    cfg = copy.deepcopy(TINY)
    cfg["optimizer"] = {"type": "sideeffect_opt.Opt", "params": {"lr": 0.01}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    assert run_main([str(path), "--world_size", "2"]) == 0
    err = capsys.readouterr().err
    assert "warning: optimizer.type 'sideeffect_opt.Opt': not checked: custom class" in err
    assert not touched.exists() and "sideeffect_opt" not in sys.modules
    # the launcher's reading imports it (and so checks it): the switch is what keeps the check clean
    run = load_run_config(path, world_size=2, import_code=True)
    assert touched.read_text() == "ran" and run.preflight.optimizer is not None
    sys.modules.pop("sideeffect_opt", None)


def test_the_config_check_module_runs_without_runpy_warning():
    # issue 31 item 8: `python -m agvm_ds.config.run` imported itself through the package first
    # (api -> config.run) and runpy warned; the batch keys' reader now lives in agvm_ds.zero
    import subprocess

    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "agvm_ds.config.run",
                           str(REPO / "ds_configs" / "quickstart.json")], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0 and "quickstart.json: ok" in proc.stdout, proc.stderr[-2000:]
    assert "RuntimeWarning" not in proc.stderr
