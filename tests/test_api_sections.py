"""``agvm_ds.initialize`` and the run file's launcher sections (model / data / train):
``train.norm_bias_decay`` takes effect, the rest is named in one warning line, bad keys are
refused before DeepSpeed builds anything; and subnormals are flushed on CPU unless told not to."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import agvm_ds
from agvm_ds.api import build_param_groups, flush_subnormals, launcher_sections
from agvm_ds.errors import ConfigError
from agvm_ds.partition import resolve_partition

MODULES = {"backbone": ["0."], "head": ["1."]}
OPT = {"type": "SGD", "params": {"lr": 0.1, "weight_decay": 0.01}}


def _model():
    return nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), nn.Linear(3, 2))


def _decays(cfg, argument=None):
    model = _model()
    nbd = launcher_sections(cfg, argument)
    groups = build_param_groups(model, resolve_partition(model, MODULES), OPT, None, nbd)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}


def test_train_norm_bias_decay_takes_effect_and_the_rest_is_named_once(capsys):
    cfg = {"model": {"architecture": "x"}, "data": {}, "train": {"norm_bias_decay": True, "max_steps": 9},
           "agvm": {}, "train_batch_size": 2}
    decays = _decays(cfg)
    assert set(decays.values()) == {0.01}  # biases and the norm decay too
    assert cfg == {"train_batch_size": 2}  # DeepSpeed sees none of agvm-ds's sections
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: agvm_ds.initialize ignores model, data, train.max_steps")
    default = _decays({"train_batch_size": 2})
    assert default["0.0.weight"] == 0.01 and default["0.0.bias"] == 0.0 and default["0.1.weight"] == 0.0
    assert capsys.readouterr().err == ""  # nothing ignored, nothing said
    assert _decays({"train": {"norm_bias_decay": False}}, argument=None)["1.bias"] == 0.0


@pytest.mark.parametrize("train,argument,message", [
    ({"norm_bias_decay": True}, False, "train.norm_bias_decay: True in the config but norm_bias_decay=False"),
    ({"norm_bias_decy": True}, None, "train.norm_bias_decy: unknown key"),
    ({"norm_bias_decay": "yes"}, None, "train.norm_bias_decay: expected true or false"),
])
def test_bad_train_sections_are_refused_before_deepspeed(train, argument, message):
    cfg = {"train_batch_size": 2, "optimizer": OPT, "train": train}
    with pytest.raises(ConfigError, match=f"^{message}"):
        agvm_ds.initialize(model=_model(), config=cfg, modules=MODULES, norm_bias_decay=argument)


def test_subnormals_flushed_unless_told_not_to(monkeypatch):
    tiny = torch.tensor([1e-39])  # a float32 subnormal
    try:
        monkeypatch.setenv("AGVM_DS_FLUSH_DENORMAL", "0")
        torch.set_flush_denormal(False)
        assert flush_subnormals() is False and float(tiny * 1.0) != 0.0
        monkeypatch.delenv("AGVM_DS_FLUSH_DENORMAL")
        if flush_subnormals():  # False only where the CPU cannot flush (no SSE3)
            assert float(tiny * 1.0) == 0.0
    finally:
        torch.set_flush_denormal(False)


def test_an_inferred_partition_is_announced_in_one_line(capsys):
    from agvm_ds.api import build_partition
    from agvm_ds.config.agvm import AGVMConfig

    model = nn.ModuleDict({"backbone": nn.Linear(2, 2), "decode_head": nn.Linear(2, 2)})  # mmseg-style
    assert build_partition(model, None, AGVMConfig()).order == ("backbone", "decode")
    out = capsys.readouterr()
    assert out.out == "[agvm-ds] agvm modules inferred (mmdetection / mmsegmentation): backbone, decode " \
                      "(anchor backbone); pass modules= to choose others\n"
    odd = nn.ModuleDict({"trunk": nn.Linear(2, 2), "out": nn.Linear(2, 2)})
    assert build_partition(odd, None, AGVMConfig(anchor="out")).anchor == "out"
    assert capsys.readouterr().err.startswith("warning: agvm modules: no known layout fits ModuleDict; "
                                              "the generic fallback (one module per top-level child) cut trunk, out")
    build_partition(odd, {"a": ["trunk."], "b": ["out."]}, AGVMConfig())
    assert capsys.readouterr() == ("", "")


def test_initialize_checks_a_deepspeed_scheduler_section_and_keeps_it():
    # initialize's own preflight (the one before deepspeed.initialize) takes a scheduler of
    # DeepSpeed's and refuses an unknown type by name (README's config table); the launcher's
    # refusal of the section is test_config_run's
    from agvm_ds.api import check_deepspeed_support, read_agvm_section

    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "optimizer": OPT,
            "gradient_clipping": 0.0}
    sched = {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}
    cfg = {**base, "scheduler": sched}
    check_deepspeed_support(cfg, read_agvm_section(cfg, None))
    assert cfg["scheduler"] == sched  # left for deepspeed.initialize to build
    bad = {**base, "scheduler": {"type": "WarmupLRR"}}
    with pytest.raises(ConfigError, match=r"^scheduler\.type: 'WarmupLRR' is not one of DeepSpeed's"):
        check_deepspeed_support(bad, read_agvm_section(bad, None))
