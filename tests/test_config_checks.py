"""The run-file checks of issue 24 that need no launcher (fast, in-process).

* item 4: NaN / infinity are refused wherever a number is expected, in agvm-ds's sections
  (pydantic, ``allow_inf_nan=False``) and DeepSpeed's (``config.checks.check_finite``), and
  the base optimizer's own argument checks run at config time; through the launcher:
  ``tests/test_config_run.py`` (``LAUNCH_CASES["NaN"]``);
* item 5: checked for a world size, a file passes exactly when the launcher accepts it on
  that many ranks: the estimator (``auto``, ``micro``, ``ranks``), the synthetic set against
  the global batch, the benchmark's class count; ``agvm_ds.initialize`` refuses ``micro``
  with one micro-batch on one rank before DeepSpeed builds an engine;
* item 3: a run whose AGVM would never act gets one ``warning:`` naming the key;
* item 10: an unknown key at any depth names the closest known one;
* item 7: ``launch/partition.py`` exits 2 with one ``error:`` line on a bad ``agvm`` section
  and prints only the JSON on stdout, whatever a library prints meanwhile.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from agvm_ds.errors import ConfigError
from agvm_ds.config.run import validate_run_dict
from train_helpers import REPO, TINY


def _launch_script(name: str):
    """``launch/<name>.py`` as a module (not put on sys.path: its name is not unique)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(tmp_path, mutate=None, world_size=2):
    raw = copy.deepcopy(TINY)
    if mutate is not None:
        mutate(raw)
    return validate_run_dict(raw, tmp_path / "run.json", world_size=world_size)


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c["agvm"].update(clamp=[0.5, float("nan")]), r"^agvm\.clamp\.1: must be a finite number, got nan$"),
    (lambda c: c["agvm"].update(eps=float("inf")), r"^agvm\.eps: must be a finite number"),
    (lambda c: c["train"]["grad_clip"].update(max_norm=float("nan")), r"^train\.grad_clip\.max_norm: must be a finite"),
    (lambda c: c["data"].update(mean=[0.5, float("-inf"), 0.5]), r"^data\.mean\.1: must be a finite"),
    (lambda c: c.update(gradient_clipping=float("nan")), r"^gradient_clipping: must be a finite number"),
    (lambda c: c["optimizer"]["params"].update(lr=float("nan")), r"^optimizer\.params\.lr: must be a finite"),
    (lambda c: c["optimizer"]["params"].update(momentum=-1.0), r"^optimizer\.params: Invalid momentum value"),
    (lambda c: c["optimizer"].update(type="AdamW", params={"lr": 0.1, "betas": [0.9, 1.5]}),
     r"^optimizer\.params: Invalid beta parameter at index 1"),
    (lambda c: c["optimizer"].update(type="AdamW", params={"lr": 0.1, "betas": [0.9, 0.0]}),
     r"^optimizer\.params\.betas: AGVM's Adam-preconditioned halves .* need beta2 in \(0, 1\)"),
])
def test_values_the_core_would_refuse_are_config_errors(tmp_path, mutate, match):
    with pytest.raises(ConfigError, match=match):
        _check(tmp_path, mutate)


def test_the_modulator_accepts_every_agvm_section_the_config_accepts():
    """Every bound the core asserts is a bound of the config model: a section that
    validates builds a Modulator; the core's own refusals are config errors first."""
    from agvm_ds.config.agvm import AGVMConfig
    from agvm_ds.config.base import parse_section
    from agvm_ds.core.modulator import Modulator

    for section in ({"clamp": [1e-9, 1e9], "eps": 0.0, "momentum": 0.0, "interval": 1, "start_step": 0},
                    {"clamp": [2.0, 2.0], "momentum": 0.999}):
        cfg = parse_section(AGVMConfig, section, "agvm")
        Modulator(["a", "b"], "a", interval=cfg.interval, momentum=cfg.momentum, start_step=cfg.start_step or 0,
                  clamp=tuple(cfg.clamp), eps=cfg.eps)
    for bad in ({"clamp": [0.0, 1.0]}, {"clamp": [2.0, 1.0]}, {"momentum": 1.0}, {"eps": -1e-9},
                {"interval": 0}, {"start_step": -1}, {"clamp": [0.5, float("inf")]}):
        with pytest.raises(ConfigError, match=r"^agvm\."):
            parse_section(AGVMConfig, bad, "agvm")


@pytest.mark.parametrize("estimator, gas, world, result", [
    ("auto", 1, 2, "ranks"), ("auto", 2, 1, "micro"), ("auto", 2, 2, "micro"), ("auto", 1, 1, "needs two"),
    ("micro", 1, 2, "ranks"), ("micro", 1, 1, "needs gradient_accumulation_steps >= 2"),
    ("ranks", 2, 1, "needs at least 2 data-parallel ranks"), ("ranks", 1, 3, "ranks"),
])
def test_the_config_check_for_a_world_size_refuses_what_the_launcher_refuses(tmp_path, estimator, gas, world,
                                                                              result):
    from agvm_ds.core.estimators import build_estimator
    from agvm_ds.train.resolve import resolve_run

    def mutate(c):
        c["agvm"]["estimator"] = estimator
        c["gradient_accumulation_steps"] = gas

    if result in ("micro", "ranks"):
        run = _check(tmp_path, mutate, world)
        assert resolve_run(run, tmp_path, world, 48).estimator.name == result
        assert build_estimator(run.agvm, gas, world, 0).name == result
    else:
        with pytest.raises(ConfigError, match=f"^agvm.estimator: '{estimator}' {result}"):
            _check(tmp_path, mutate, world)


def test_the_quickstart_checks_on_one_and_two_ranks():
    from agvm_ds.config.run import load_run_config

    for world, gas in ((1, 2), (2, 1)):
        run = load_run_config(REPO / "ds_configs" / "quickstart.json", world_size=world)
        assert (run.global_batch, run.grad_accum, run.agvm.estimator) == (16, gas, "auto")
    with pytest.raises(ConfigError, match=r"^agvm\.estimator: 'ranks' needs at least 2"):
        load_run_config(REPO / "ds_configs" / "quickstart.json", ["agvm.estimator=ranks"], world_size=1)


def test_synthetic_size_and_classes_are_checked_with_the_world(tmp_path):
    from agvm_ds.config.checks import SYNTHETIC_CLASSES
    from agvm_ds.data.shapes import SHAPE_NAMES

    assert SYNTHETIC_CLASSES == len(SHAPE_NAMES)
    with pytest.raises(ConfigError, match=r"^data\.synthetic\.train: 6 training images are fewer than one global"):
        _check(tmp_path, lambda c: c["data"]["synthetic"].update(train=6))
    with pytest.raises(ConfigError, match=r"^model\.num_classes: 5 but the embedded benchmark"):
        _check(tmp_path, lambda c: c["model"].update(num_classes=5))


def test_initialize_refuses_micro_on_one_rank_before_deepspeed_builds_anything(monkeypatch):
    import deepspeed

    import agvm_ds

    def never(*args, **kwargs):
        raise AssertionError("deepspeed.initialize was reached")

    monkeypatch.setattr(deepspeed, "initialize", never)
    monkeypatch.setenv("WORLD_SIZE", "1")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "agvm": {"estimator": "micro"}}
    with pytest.raises(ConfigError, match=r"^agvm\.estimator: 'micro' needs gradient_accumulation_steps >= 2"):
        agvm_ds.initialize(model=model, config=cfg, modules={"a": ["0."], "b": ["1."]})


@pytest.mark.parametrize("train, agvm, key", [
    ({"max_steps": 12, "warmup_steps": 2}, {"start_step": 12}, "agvm.start_step: 12, but the run has 12 steps"),
    ({"max_steps": 2, "warmup_steps": 5}, {"start_step": None}, "train.warmup_steps: AGVM starts at the end of "
                                                               "warmup, step 2, but the run has 2 steps"),
    ({"max_steps": 12, "warmup_steps": 2}, {"start_step": 11}, None),
    ({"max_steps": 12, "warmup_steps": 2}, {"start_step": 40, "enabled": False}, None),
])
def test_agvm_that_would_never_act_is_one_warning(tmp_path, train, agvm, key):
    from agvm_ds.train.resolve import resolve_run

    def mutate(c):
        c["train"].update(train, grad_clip=None)
        c["agvm"].update(agvm)

    run = _check(tmp_path, mutate)
    resolved = resolve_run(run, tmp_path, 2, 48)
    if key is None:
        assert run.warnings == [] and resolved.warnings == ()
    else:
        assert len(run.warnings) == 1 and run.warnings[0].startswith(key), run.warnings
        assert resolved.warnings == (run.warnings[0],) and not resolved.agvm_active


def test_unknown_nested_keys_name_the_closest_known_key(tmp_path):
    cases = [(lambda c: c["data"]["synthetic"].update(trian=3), "data.synthetic.trian: unknown key (did you mean 'train'?)"),
             (lambda c: c["train"]["grad_clip"].update(max_nrm=1), "train.grad_clip.max_nrm: unknown key (did you "
                                                                   "mean 'max_norm'?)"),
             (lambda c: c["agvm"].update(intreval=3), "agvm.intreval: unknown key (did you mean 'interval'?)"),
             (lambda c: c["model"].update(overrides={"head.num_conv": 2}), "head.num_conv: unknown key (did you "
                                                                            "mean 'num_convs'?)")]
    for mutate, needle in cases:
        with pytest.raises(ConfigError) as info:
            _check(tmp_path, mutate)
        assert needle in str(info.value)


def test_spec_not_found_names_each_place_once(tmp_path):
    from agvm_ds.config.spec import resolve_spec_path

    with pytest.raises(FileNotFoundError) as info:
        resolve_spec_path("models/nope.json")
    assert "models/models" not in str(info.value) and "models/nope.json" in str(info.value)


def test_partition_json_is_the_only_stdout_and_a_bad_agvm_section_exits_2(tmp_path, capsys, monkeypatch):
    partition = _launch_script("partition")

    import agvm_ds.report

    bad = copy.deepcopy(TINY)
    bad["agvm"]["interval"] = 0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    assert partition.main(["--deepspeed_config", str(path), "--json"]) == 2  # before: a traceback, exit 1
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == ["error: agvm.interval: Input should be greater than or equal to 1"]
    # whatever a library prints while the report is made (DeepSpeed's logger binds sys.stdout
    # when it is first imported: its accelerator line) goes to stderr; stdout is the JSON
    report = agvm_ds.report.partition_report

    def noisy(*args, **kwargs):
        import logging

        logger = logging.getLogger("test_partition_noise")
        logger.addHandler(logging.StreamHandler(sys.stdout))  # bound now, as DeepSpeed's is
        logger.warning("a library's line")
        print("a library's print")
        return report(*args, **kwargs)

    monkeypatch.setattr(agvm_ds.report, "partition_report", noisy)
    assert partition.main(["--deepspeed_config", str(REPO / "ds_configs" / "quickstart.json"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["model"] == "retinanet_uninet_tiny"
    assert "a library's line" in err and "a library's print" in err


def test_a_data_error_from_a_loader_worker_is_one_line():
    """A DataLoader worker re-raises a rank's DatasetError with the worker's traceback in the
    message; the launcher's ``error:`` line keeps only the original message (item 6)."""
    launch_train = _launch_script("train")

    from agvm_ds.data.errors import DatasetError

    msg = "/data/x.png: cannot read image (image file is truncated)"
    wrapped = DatasetError(f"Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           f"call last):\n  File \"coco.py\", line 1, in _decode\n"
                           f"agvm_ds.data.errors.DatasetError: {msg}\n")
    assert launch_train.one_line(wrapped) == msg
    assert launch_train.one_line(DatasetError(msg)) == msg
    assert launch_train.peer_failed(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"))
    assert not launch_train.peer_failed(ValueError("a bug of our own"))
