"""The base-optimizer registry (agvm_ds/optim/registry.py) and AGVM as a torch optimizer.

* every row builds, steps, and keeps exactly the state it names; a named second moment is the
  EMA of g² (checked against (1 − β2)·g² after one step from zero);
* Lion, Adamax and RMSprop (preconditioned with ``square_avg``) inside a real 2-rank DeepSpeed
  engine against the float64 replay of tests/reference.py driven by the run's μ;
* an unknown optimizer with per-tensor norms is refused under ZeRO ≥ 1 (config check, the
  launcher, ``agvm_ds.initialize``) and accepted at stage 0 (or when it declares itself
  element-wise);
* torch's step and state-dict hooks fire on AGVM; the docs table is the registry's.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from agvm_ds.errors import ConfigError
from agvm_ds.config.run import validate_run_dict
from agvm_ds.core.modulator import Modulator
from agvm_ds.core.optimizer import AGVM, build_base_optimizer
from agvm_ds.partition import param_groups, resolve_partition
from agvm_ds.optim import registry
from train_helpers import REPO, TINY, run_train, tail, write_config


class PerTensorNormSGD(torch.optim.Optimizer):
    """p ← p − lr · g / ‖g‖ per tensor: wrong on ZeRO's flat partitions (a norm per slice)."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p -= group["lr"] * p.grad / (p.grad.norm() + 1e-12)


class DeclaredSignSGD(PerTensorNormSGD):
    """p ← p − lr · sign(g): element-wise, and says so."""

    agvm_elementwise = True

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p -= group["lr"] * torch.sign(p.grad)


B2, EPS = 0.95, 1e-7
HYPER = {  # hyper-parameters that switch every optional state on
    "SGD": {"lr": 0.1, "momentum": 0.9},
    "AdamW": {"lr": 1e-3, "betas": (0.9, B2), "eps": EPS, "amsgrad": True},
    "Adam": {"lr": 1e-3, "betas": (0.9, B2), "eps": EPS, "amsgrad": True},
    "Lamb": {"lr": 1e-3, "betas": (0.9, B2), "eps": EPS},
    "Lars": {"lr": 0.1, "momentum": 0.9},
    "Lion": {"lr": 1e-4, "betas": (0.9, 0.99)},
    "RMSprop": {"lr": 1e-3, "alpha": B2, "eps": EPS, "momentum": 0.9, "centered": True},
    "Adamax": {"lr": 1e-3, "betas": (0.9, B2), "eps": EPS},
    "Adagrad": {"lr": 0.1},
    "Adafactor": {"lr": 0.01},
    "Muon": {"lr": 0.02},
    "timm.optim.Lamb": {"lr": 1e-3, "betas": (0.9, B2), "eps": EPS},
    "timm.optim.Lars": {"lr": 0.1, "momentum": 0.9},
}


@pytest.mark.parametrize("name", [r.name for r in registry.ROWS])
def test_row_builds_and_keeps_exactly_the_state_it_names(name):
    row = registry.find(name)
    assert row.name == name and set(HYPER) == {r.name for r in registry.ROWS}
    if row.target.startswith("agvm_ds.optim."):
        pytest.importorskip(row.target.partition(":")[0])  # added by a parallel change
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    params = [model.weight] if name == "Muon" else list(model.parameters())  # Muon: matrices only
    opt = build_base_optimizer({"type": name, "params": HYPER[name]}, [{"params": params}])
    assert type(opt) is row.load() and registry._row_of_class(type(opt)) is row
    grads = {p: 0.01 * torch.randn_like(p, dtype=torch.float64).float() for p in params}
    for p in params:
        p.grad = grads[p].clone()
    opt.step()
    for p in params:
        keys = set(opt.state[p]) - {"step"}
        if row.factored:
            assert row.state == () and row.second_moment is None and keys, keys
            continue
        assert keys == set(row.state_names(HYPER[name])), (name, keys)
        if row.second_moment:  # after one step from zero the g² average is (1 − β2)·g²
            group = opt.param_groups[0]
            assert row.beta2_of(group) == B2 and row.eps_of(group) == EPS
            want = (1 - B2) * grads[p].double() ** 2
            assert torch.allclose(opt.state[p][row.second_moment].double(), want, rtol=1e-5, atol=0)


def test_lookup_by_other_spellings_and_the_fallback_row():
    assert registry.find("adamw") is registry.find("torch.optim.AdamW") is registry.find("AdamW")
    assert registry.find("timm.optim.lion.Lion").name == "Lion"  # the class's own module path
    other = registry.find("NAdam")  # a torch.optim class without a row
    assert other.whole_tensor is None and other.auto_precondition == "none" and other.target.endswith(":NAdam")
    assert registry.find(f"{__name__}.DeclaredSignSGD").zero_safe()
    assert not registry.find(f"{__name__}.PerTensorNormSGD").zero_safe()
    with pytest.raises(ConfigError, match=r"^optimizer\.type: unknown optimizer 'Adamm'"):
        registry.find("Adamm")


def _validate(tmp_path, opt, stage, precondition="auto"):
    cfg = copy.deepcopy(TINY)
    cfg["optimizer"] = opt
    cfg["zero_optimization"] = {"stage": stage}
    cfg["agvm"]["precondition"] = precondition
    # as the training launcher reads it: a class named by a module path is imported and checked
    return validate_run_dict(cfg, tmp_path / "run.json", world_size=2, import_code=True)


def test_config_check_refuses_what_is_wrong_under_zero_or_unpreconditionable(tmp_path):
    norm = {"type": f"{__name__}.PerTensorNormSGD", "params": {"lr": 0.1}}
    for stage in (1, 2, 3):
        with pytest.raises(ConfigError) as err:
            _validate(tmp_path, norm, stage)
        msg = str(err.value)
        assert msg.startswith(f"optimizer.type: {__name__}.PerTensorNormSGD is not in") and "\n" not in msg, msg
    _validate(tmp_path, norm, 0)
    _validate(tmp_path, {"type": f"{__name__}.DeclaredSignSGD", "params": {"lr": 0.1}}, 2)
    for whole in ("Adafactor", "timm.optim.Lamb", "Muon"):
        with pytest.raises(ConfigError, match=r"^optimizer\.type: .*whole tensors.*stage 1"):
            _validate(tmp_path, {"type": whole, "params": {"lr": 0.01}}, 1)
        _validate(tmp_path, {"type": whole, "params": {"lr": 0.01}}, 0)
    _validate(tmp_path, {"type": "Lamb", "params": {"lr": 0.01}}, 3)  # exact partition path
    # element-wise, but its construction-time state breaks every ZeRO checkpoint (measured)
    with pytest.raises(ConfigError, match=r"^optimizer\.type: Adagrad .*state_dict.*stage 0$"):
        _validate(tmp_path, {"type": "Adagrad", "params": {"lr": 0.01}}, 2)
    _validate(tmp_path, {"type": "Adagrad", "params": {"lr": 0.01}}, 0)
    for raw in ("Lion", "Adamax", "SGD"):
        with pytest.raises(ConfigError, match=r"^agvm\.precondition: 'adam' needs"):
            _validate(tmp_path, {"type": raw, "params": {"lr": 0.01}}, 2, "adam")
    _validate(tmp_path, {"type": "RMSprop", "params": {"lr": 0.01}}, 2, "adam")
    with pytest.raises(ConfigError, match=r"^agvm\.precondition: .*centered"):
        _validate(tmp_path, {"type": "RMSprop", "params": {"lr": 0.01, "centered": True}}, 2, "adam")
    assert registry.check(registry.find("Lion"), {}, 2, "auto") == "none"
    assert registry.check(registry.find("AdamW"), {}, 2, "auto") == "adam"
    assert registry.check(registry.find("RMSprop"), {}, 2, "auto") == "none"


def test_initialize_refuses_per_tensor_optimizer_under_zero_before_deepspeed():
    import agvm_ds
    from agvm_cases import MODULES, build_model, ds_config

    cfg = ds_config(1, 2, {"type": f"{__name__}.PerTensorNormSGD", "params": {"lr": 0.1}}, world=1)
    with pytest.raises(ConfigError, match=r"^optimizer\.type: .*PerTensorNormSGD is not in"):
        agvm_ds.initialize(model=build_model(), config=cfg, modules=MODULES)


def test_launcher_refuses_per_tensor_optimizer_under_zero(tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg["optimizer"] = {"type": f"{__name__}.PerTensorNormSGD", "params": {"lr": 0.1}}
    proc = run_train(write_config(tmp_path / "norm.json", cfg), tmp_path / "out", launcher="python",
                     extra_env={"WORLD_SIZE": "2", "PYTHONPATH": str(REPO / "tests")}, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, tail(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: optimizer.type:"), proc.stderr


# ------------------------------------------------------------------ real engines, 2 ranks
def test_lion_adamax_rmsprop_in_deepspeed_match_float64_replay():
    from agvm_cases import train_many
    from agvm_ds.testing.distributed import run_distributed
    from test_agvm_distributed import GAS, INTERVAL, START, STEPS, _check_against_reference, _max_param_rel, _rel

    common = dict(gas=GAS, steps=STEPS, estimator="micro", interval=INTERVAL, start=START)
    cases = [dict(stage=2, opt="lion", **common), dict(stage=1, opt="adamax", **common),
             dict(stage=3, opt="rmsprop", **common)]  # preconditioned with square_avg / alpha
    runs = run_distributed(train_many, 2, cases)
    for i, case in enumerate(cases):
        for rank in (0, 1):
            res = runs[rank][i]
            losses, params_ref = _check_against_reference(res, 2, case["opt"], "micro", 0.0)
            for a, b in zip(res["losses"], losses[rank]):
                assert _rel(a, b) <= 1e-5, (case["opt"], rank)
            assert _max_param_rel(res["params"], params_ref) <= 1e-5, case["opt"]


# ------------------------------------------------------------------ AGVM as a torch optimizer
def _agvm(opt_type="AdamW", seed=0):
    torch.manual_seed(seed)
    model = nn.ModuleDict({"bb": nn.Linear(3, 3), "hd": nn.Linear(3, 2)})
    partition = resolve_partition(model, {"bb": ["bb."], "hd": ["hd."]})
    groups = param_groups(model, partition, weight_decay=0.01)
    mod = Modulator(["bb", "hd"], "bb", start_step=0)
    mod.mu = torch.tensor([1.0, 2.0], dtype=torch.float64)
    base = build_base_optimizer({"type": opt_type, "params": {"lr": 0.01}}, groups)
    return model, AGVM(base, mod)


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_torch_step_hooks_fire_around_every_step_call():
    model, opt = _agvm()
    assert opt.param_groups is opt.base.param_groups and opt.state is opt.base.state
    seen = []
    pre = opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", [g["lr"] for g in o.param_groups])))
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", [g["lr"] for g in o.param_groups])))
    _grads(model, 1)
    opt.step()
    groups = opt.param_groups
    opt.param_groups = [groups[2]]  # as ZeRO-1/2 do: one group per call
    opt.step()
    opt.param_groups = groups
    # the hooks see the scheduled lr (μ is applied inside step and restored before they run)
    assert seen == [("pre", [0.01] * 4), ("post", [0.01] * 4), ("pre", [0.01]), ("post", [0.01])]
    pre.remove()
    opt.step()
    assert [s[0] for s in seen[4:]] == ["post"]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_round_trips_the_base_state_and_hooks_fire():
    model, opt = _agvm()
    for s in (1, 2):
        _grads(model, s)
        opt.step()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 7})
    sd = opt.state_dict()
    assert sd["extra"] == 7 and len(sd["state"]) == 4 and calls == ["sd_pre"]
    model2, opt2 = _agvm(seed=5)
    with torch.no_grad():
        for p2, p in zip(model2.parameters(), model.parameters()):
            p2.copy_(p)
    opt2.register_load_state_dict_pre_hook(lambda o, d: {k: v for k, v in d.items() if k != "extra"})
    opt2.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    opt2.load_state_dict(copy.deepcopy(sd))  # as from a file: torch loads tensors without copying
    assert calls == ["sd_pre", "load_post"]
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key])
    _grads(model, 3)
    _grads(model2, 3)
    opt.step()
    opt2.step()
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)


def test_add_param_group_needs_a_known_module_and_is_refused_once_measured():
    model, opt = _agvm("SGD")
    extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="no 'module' key"):
        opt.add_param_group({"params": [extra]})
    with pytest.raises(ValueError, match="unknown module 'neck'"):
        opt.add_param_group({"params": [extra], "module": "neck"})
    opt.add_param_group({"params": [extra], "module": "hd"})
    assert opt.base.param_groups[-1]["params"] == [extra] and len(opt.param_groups) == 5
    extra.grad = torch.ones(2)
    opt.step()  # scheduled lr 0.01 × μ_hd 2.0
    assert torch.allclose(extra.detach(), torch.full((2,), -0.02))
    opt.groups_frozen = True
    with pytest.raises(ValueError, match="add every group before"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "module": "hd"})


# ------------------------------------------------------------------ docs
def test_docs_table_and_readme_list_match_the_registry():
    doc = (REPO / "docs" / "agvm.md").read_text()
    assert registry.markdown_table() in doc, "regenerate with: python -c 'from agvm_ds.optim.registry import " \
                                             "markdown_table; print(markdown_table())'"
    names = {r.name for r in registry.ROWS if "." not in r.name}
    readme = (REPO / "README.md").read_text()
    lists = [line for line in readme.splitlines() if "registry's base optimizers" in line]
    assert len(lists) == 2
    for line in lists:
        listed = set(re.findall(r"`([A-Za-z]+)`", line.split("registry's base optimizers", 1)[1].split("—")[0]))
        assert listed == names, (listed ^ names)
