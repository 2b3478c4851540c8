"""Exact or refused, closed by construction (issue 30): the allow-list over DeepSpeed's whole
schema (agvm_ds/zero/schema.py), the rows of issue 30's table, and the single-key fuzz.

| setting (issue 30, DeepSpeed 0.19.8) | here |
|---|---|
| ``gradient_allreduce_op: "sum"`` (ZeRO 0-2) | refused: schema (not measured) |
| ``managed_gradient_accumulation: false`` | refused: schema |
| ``set_gradient_accumulation_boundary()`` loops | refused at the first call, one line |
| ZeRO-3, ``reduce_scatter: false``, ``gradient_predivide_factor: 2`` | refused: schema |
| ``tensor_parallel.autotp_size: 2`` + ``partition_config`` | refused: schema (section) |
| ``communication_data_type: "fp16"`` on fp32 weights | refused: support table |
| fp32 weights + ``grad_accum_dtype: "bf16"`` (ZeRO-1) | refused: support table |
| ZeRO-0 + DeepSpeed ``fp16`` | refused: support table (DeepSpeed's own path is wrong) |
| prescale/predivide with ``reduce_scatter``; ``bf16_master_weights_and_grads`` alone; ``offload_optimizer.ratio``; ``zenflow``; ``sparse_gradients``; ``allgather_bucket_size: 1``; ``mics_shard_size`` | refused in one line before the engine (schema, DeepSpeed's own parse, support table) |
| the self-check's own copy of the run | it runs the whole config: tests below |
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

import agvm_ds
from agvm_ds.config.run import main as check_main
from agvm_ds.errors import ConfigError
from agvm_ds.zero import schema
from agvm_ds.zero.settings import Setting, precision_of

from agvm_cases import MODULES, build_model, ds_config
from train_helpers import TINY, write_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import config_fuzz  # noqa: E402


def test_every_key_of_the_installed_deepspeed_is_classified():
    keys = schema.discover()
    assert len(keys) > 250  # the recording really saw DeepSpeed's reads and its models' fields
    assert {"zero_optimization.reduce_scatter", "gradient_allreduce_op", "managed_gradient_accumulation",
            "bf16.bf16_master_weights_and_grads", "tensor_parallel.autotp_size",
            "zero_optimization.offload_optimizer.ratio"} <= keys
    assert schema.unclassified(keys) == []
    # no row of the table names a key the installed DeepSpeed does not read
    assert sorted(k for k in schema.TABLE if k not in keys) == []


def test_a_planted_deepspeed_field_fails_the_schema_check():
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    class PlantedZero(DeepSpeedZeroConfig):  # an upgrade adds a ZeRO knob
        new_gradient_knob: bool = False

    models = dict(schema.SECTION_MODELS, zero_optimization=PlantedZero)
    assert schema.unclassified(schema.discover(section_models=models)) == ["zero_optimization.new_gradient_knob"]

    class PlantedTop(DeepSpeedConfig):  # an upgrade reads a new top-level key
        def _initialize_params(self, param_dict):
            super()._initialize_params(param_dict)
            self.new_reduction = param_dict.get("new_reduction_mode", "mean")

    assert schema.unclassified(schema.discover(config_class=PlantedTop)) == ["new_reduction_mode"]


# (the change to a ZeRO-2 base, the key the one line names) — every row of issue 30's table
# that is refused, and DeepSpeed's own assertion cases
REFUSED = [
    ({"gradient_allreduce_op": "sum"}, "gradient_allreduce_op"),
    ({"gradient_allreduce_op": "sum", "zero_optimization": {"stage": 0}}, "gradient_allreduce_op"),
    ({"managed_gradient_accumulation": False}, "managed_gradient_accumulation"),
    ({"zero_optimization": {"stage": 3, "reduce_scatter": False}, "gradient_predivide_factor": 2.0},
     "gradient_predivide_factor"),
    ({"tensor_parallel": {"autotp_size": 2, "partition_config": {"use_default_specs": True}}}, "tensor_parallel"),
    ({"communication_data_type": "fp16"}, "communication_data_type"),
    ({"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "bf16"}}, "data_types.grad_accum_dtype"),
    ({"zero_optimization": {"stage": 0}, "fp16": {"enabled": True}}, "fp16"),
    ({"prescale_gradients": True, "zero_optimization": {"reduce_scatter": True}}, "prescale_gradients"),
    ({"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}}, "bf16.bf16_master_weights_and_grads"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu", "ratio": 0.5}}},
     "zero_optimization.offload_optimizer.ratio"),
    ({"zero_optimization": {"zenflow": {"topk_ratio": 0.1}}}, "zero_optimization.zenflow"),
    ({"sparse_gradients": True}, "deepspeed config: Sparse compression"),
    ({"zero_optimization": {"allgather_bucket_size": 1}}, "zero_optimization.allgather_bucket_size"),
    ({"zero_optimization": {"stage": 3, "mics_shard_size": 2}}, "deepspeed config: MiCS"),
    ({"bf16": {"enabeld": True}}, "bf16.enabeld"),
    ({"tensorboard": {"enabled": True, "outptu_path": "/tmp/tb"}}, "tensorboard.outptu_path: unknown key (did you mean"),
]


def _run_dict(change: dict) -> dict:
    cfg = copy.deepcopy(TINY)
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) and isinstance(value, dict) else value
    return cfg


@pytest.mark.parametrize("change,key", REFUSED, ids=[k for _, k in REFUSED])
def test_config_check_refuses_each_row_in_one_line(tmp_path, capsys, change, key):
    path = write_config(tmp_path / "run.json", _run_dict(change))
    assert check_main([str(path), "--world_size", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}"), err


def test_initialize_refuses_each_row_before_deepspeed_builds_anything(monkeypatch):
    import deepspeed

    def never(*args, **kwargs):
        raise AssertionError("deepspeed.initialize was reached")

    monkeypatch.setattr(deepspeed, "initialize", never)
    monkeypatch.setenv("WORLD_SIZE", "1")
    for change, key in REFUSED:
        cfg = ds_config(2, 2, "sgd", world=1)
        for section, value in change.items():
            cfg[section] = {**cfg[section], **value} if isinstance(cfg.get(section), dict) else value
        with pytest.raises(ConfigError) as err:
            agvm_ds.initialize(model=build_model(), config=cfg, modules=MODULES)
        assert str(err.value).startswith(key) and "\n" not in str(err.value), (key, str(err.value))


def test_agvm_off_lifts_the_agvm_refusals_but_not_deepspeeds(tmp_path, capsys):
    off = {"agvm": {"enabled": False}}
    path = write_config(tmp_path / "a.json", _run_dict({"gradient_allreduce_op": "sum", **off}))
    assert check_main([str(path), "--world_size", "2"]) == 0
    path = write_config(tmp_path / "b.json", _run_dict({"zero_optimization": {"stage": 0}, "fp16": {"enabled": True},
                                                        **off}))
    assert check_main([str(path), "--world_size", "2"]) == 2  # DeepSpeed's own stage-0 fp16 path is wrong
    assert capsys.readouterr().err.startswith("error: fp16: ")


def test_the_reader_follows_deepspeeds_spellings():
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "optimizer": {"type": "SGD"}}
    read = lambda extra: Setting.read({**base, **extra}, "auto", 2)  # noqa: E731
    assert read({"bfloat16": {"enabled": True}}).precision.name == "bf16"
    assert read({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "torch.float32"}}).precision.name \
        == "bf16+fp32acc"
    assert read({"torch_autocast": {"enabled": True, "dtype": "torch.float16"}}).precision.name == "autocast-fp16"
    assert read({"zero_optimization": {"stage": 2, "cpu_offload": True}}).offload_optimizer == "cpu"
    assert read({"zero_optimization": {"stage": 3}}).overlap_comm is True  # DeepSpeed's stage-3 default
    assert read({}).estimator == "micro" and read({"gradient_accumulation_steps": 1}).estimator == "ranks"
    assert precision_of(read({"communication_data_type": "bf16", "bf16": {"enabled": True}}).parsed).comm == "bf16"
    with pytest.raises(ConfigError, match="^zero_optimization: must be an object"):
        read({"zero_optimization": None})


def test_selfcheck_runs_the_whole_deepspeed_config():
    from agvm_ds.selfcheck import DROPPED, replaced, selfcheck_config

    run = {**copy.deepcopy(TINY), "bfloat16": {"enabled": True}, "gradient_clipping": 0.5,
           "tensorboard": {"enabled": True, "output_path": "/tmp/tb"}, "train_micro_batch_size_per_gpu": 16,
           "communication_data_type": "fp32", "zero_optimization": {"stage": 2, "reduce_bucket_size": 64}}
    run.pop("train_batch_size", None)
    run["gradient_accumulation_steps"] = 2
    cfg = selfcheck_config(run, 2)
    for key in ("bfloat16", "communication_data_type", "zero_optimization"):
        assert cfg[key] == run[key], key  # kept as the run has it (the bf16 alias included)
    assert "tensorboard" not in cfg and cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 0.0
    assert replaced(run, cfg) == [
        "micro batch 16 -> 8",
        "gradient_clipping 0.5 -> 0 (clipping scales the update after AGVM's statistics; the brute force's Adam "
        "moment is built from unclipped gradients)",
        "left out (inert: logs, files, lr schedule): tensorboard"]
    # only inert sections may be left out: dropping one that moves gradients would make the
    # self-check measure another run than the job's
    assert all(schema.classification(k).kind in (schema.INERT, schema.AGVM) for k in DROPPED), DROPPED


def test_single_key_fuzz_is_accepted_or_refused_in_one_line():
    rows = config_fuzz.run_preflight()
    assert len(rows) > 250
    third = [(r["key"], r["message"]) for r in rows if r["verdict"] == "third"]
    assert third == []
    refused = [r for r in rows if r["verdict"] == "refused"]
    accepted = [r for r in rows if r["verdict"] == "accepted"]
    assert refused and accepted
    # every key the table refuses is refused at its non-default value (the fuzz is not vacuous)
    for r in rows:
        row = schema.classification(r["key"])
        if row.kind == schema.REFUSED and not row.section:
            assert r["verdict"] == "refused", r
    assert all("\n" not in r["message"] for r in refused)


def test_a_manual_accumulation_boundary_is_refused_at_its_first_call():
    from agvm_ds.testing.distributed import run_distributed

    from agvm_cases import manual_boundary

    (refused, plain_boundary), = run_distributed(manual_boundary, 1)
    assert refused is not None and refused[0] == "ConfigError", refused
    assert refused[1].startswith("engine.set_gradient_accumulation_boundary: ") and "\n" not in refused[1]
    assert plain_boundary is False  # AGVM off: DeepSpeed's own API is left alone
