"""Bad `agvm` sections and partitions raise one clear error naming the key; the optimizer
wrapper restores the scheduled lr and scales only its own module's groups."""

import pytest
import torch
from torch import nn

from agvm_ds.config.agvm import AGVMConfig
from agvm_ds.config.base import parse_section
from agvm_ds.errors import ConfigError
from agvm_ds.core.modulator import Modulator
from agvm_ds.core.optimizer import AGVM, base_optimizer_class, build_base_optimizer
from agvm_ds.partition import PartitionError, param_groups, resolve_partition


@pytest.mark.parametrize("section, key", [
    ({"intervall": 5}, "agvm.intervall"),
    ({"interval": 0}, "agvm.interval"),
    ({"interval": -3}, "agvm.interval"),
    ({"momentum": 1.0}, "agvm.momentum"),
    ({"momentum": -0.5}, "agvm.momentum"),
    ({"clamp": [10, 0.5]}, "agvm.clamp"),
    ({"estimator": "halves"}, "agvm.estimator"),
    ({"precondition": "rms"}, "agvm.precondition"),
])
def test_bad_agvm_section_names_the_key(section, key):
    with pytest.raises(ConfigError) as err:
        parse_section(AGVMConfig, section, "agvm")
    assert str(err.value).startswith(key), str(err.value)


def test_unknown_anchor_is_rejected_before_any_distributed_work():
    import agvm_ds

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    # two micro-batches: a run the support table accepts on one rank ('micro' has halves)
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "agvm": {"anchor": "trunk"}}
    with pytest.raises(ConfigError, match=r"^agvm.anchor: unknown module 'trunk'"):
        agvm_ds.initialize(model=model, config=cfg, modules={"backbone": ["0."], "head": ["1."]})
    with pytest.raises(ConfigError, match="belong to no module: 1.weight, 1.bias"):
        agvm_ds.initialize(model=model, config={**cfg, "agvm": {}}, modules={"backbone": ["0."]})
    with pytest.raises(ConfigError, match=r"optimizer.type: unknown optimizer 'Adamm'"):
        agvm_ds.initialize(model=model, config={**cfg, "agvm": {}, "optimizer": {"type": "Adamm"}},
                           modules={"backbone": ["0."], "head": ["1."]})


def test_partition_longest_prefix_and_empty_module():
    model = nn.ModuleDict({"head": nn.ModuleDict({"cls": nn.Linear(2, 2), "box": nn.Linear(2, 2)})})
    owner = resolve_partition(model, {"a": ["head."], "b": ["head.cls."]}).owner
    assert owner["head.cls.weight"] == "b" and owner["head.box.weight"] == "a"
    with pytest.raises(PartitionError, match=r"module .ghost.: prefix .neck\.. matches no parameter"):
        resolve_partition(model, {"a": ["head."], "ghost": ["neck."]})


def test_wrapper_scales_lr_per_module_and_restores_it():
    torch.manual_seed(0)
    model = nn.ModuleDict({"bb": nn.Linear(3, 3), "hd": nn.Linear(3, 3)})
    partition = resolve_partition(model, {"bb": ["bb."], "hd": ["hd."]})
    groups = param_groups(model, partition, weight_decay=0.1)
    assert [(g["module"], g["weight_decay"]) for g in groups] == [("bb", 0.1), ("bb", 0.0), ("hd", 0.1), ("hd", 0.0)]
    mod = Modulator(["bb", "hd"], "bb", start_step=1)
    mod.mu = torch.tensor([1.0, 2.5], dtype=torch.float64)
    opt = AGVM(build_base_optimizer({"type": "SGD", "params": {"lr": 0.1}}, groups), mod)
    for step in (0, 1):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step_index = step
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.param_groups = [opt.param_groups[2]]  # as ZeRO-1/2 do: one group per call
        opt.step()
        assert len(opt.base.param_groups) == 1
        opt.param_groups = groups
        for n, p in model.named_parameters():
            expected = torch.zeros_like(p)
            if n == "hd.weight":  # plain SGD with decay 0.1: Δ = lr·μ·(g + wd·w)
                expected = 0.1 * (2.5 if step >= 1 else 1.0) * (1 + 0.1 * before[n])
            assert torch.allclose(before[n] - p.detach(), expected, atol=1e-6), (step, n)
        assert all(g["lr"] == 0.1 for g in groups)


def test_optimizer_registry():
    assert base_optimizer_class("adamw") is torch.optim.AdamW
    assert base_optimizer_class("SGD") is torch.optim.SGD
    import timm.optim

    from agvm_ds.optim.lamb import Lamb
    from agvm_ds.optim.lars import Lars

    assert base_optimizer_class("Lamb") is Lamb  # the partition-exact ones (agvm_ds/optim)
    assert base_optimizer_class("Lars") is Lars
    assert base_optimizer_class("timm.optim.Lamb") is timm.optim.Lamb
    assert base_optimizer_class("Lion") is timm.optim.Lion
    with pytest.raises(ValueError, match="optimizer.type"):
        base_optimizer_class("NoSuchOpt")


class _Net(nn.Module):
    """Conv + BatchNorm + GroupNorm + LayerScale-like 1-d gamma + head, two modules."""

    agvm_modules = {"backbone": ["body."], "head": ["head."]}

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, bias=False))
        self.body.gamma = nn.Parameter(torch.ones(4))
        self.head = nn.Sequential(nn.GroupNorm(2, 4), nn.Linear(4, 2))


def test_api_weight_decay_switch_exempts_norms_biases_1d_or_decays_everything():
    """initialize's norm_bias_decay: the default exempts exactly the norm, bias and 1-d
    parameters (checked against a naive walk); True decays every parameter, as
    deepspeed.initialize does with the same JSON."""
    from agvm_ds.api import build_param_groups

    model = _Net()
    partition = resolve_partition(model)
    section = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.05}}
    exempt = {n for n, p in model.named_parameters() if p.ndim <= 1}  # every norm/bias/gamma here is 1-d
    groups = build_param_groups(model, partition, section, None, norm_bias_decay=False)
    name = {id(p): n for n, p in model.named_parameters()}
    got = {name[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert got == exempt and {g["weight_decay"] for g in groups} == {0.0, 0.05}
    everything = build_param_groups(model, partition, section, None, norm_bias_decay=True)
    assert [g["weight_decay"] for g in everything] == [0.05, 0.05]
    assert sorted(name[id(p)] for g in everything for p in g["params"]) == sorted(name.values())


def test_agvm_section_comes_typed_or_in_the_dict_never_both():
    from agvm_ds.api import read_agvm_section, read_config

    typed = AGVMConfig(interval=4, estimator="ranks")
    assert read_agvm_section({}, typed) is typed
    parsed = read_agvm_section(read_config({"agvm": {"interval": 4, "_note": "a comment", "estimator": "ranks"}}), None)
    assert parsed == typed
    with pytest.raises(ConfigError, match=r"^agvm: given both"):
        read_agvm_section({"agvm": {"interval": 4}}, typed)
    with pytest.raises(ConfigError, match=r"^agvm: expected an AGVMConfig"):
        read_agvm_section({}, {"interval": 4})
