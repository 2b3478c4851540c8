"""Norm options of the model specs, FrozenBatchNorm2d, and BatchNorm statistics averaged
across ranks (agvm_ds.models.norms), each against a float64 reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import agvm_ds  # noqa: F401  (torchvision compat before timm)
from agvm_ds.errors import ConfigError
from agvm_ds.models import build_model
from agvm_ds.models.norms import (FrozenBatchNorm2d, average_batchnorm_statistics,
                                  freeze_batchnorm)
from agvm_ds.config.spec import load_spec
from agvm_ds.testing.distributed import run_distributed
from test_models_pipelines import make_batch

SPEC = "models/retinanet_uninet_tiny.json"


def _frozen_reference(x, w, b, mean, var, eps):
    shape = (1, -1, 1, 1)
    x, w, b, mean, var = (t.double() for t in (x, w, b, mean, var))
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * w.view(shape) + b.view(shape)


def test_frozen_bn_matches_float64_reference_and_takes_no_gradient():
    g = torch.Generator().manual_seed(3)
    c, eps = 5, 1e-3
    w, b, mean = (torch.randn(c, generator=g) for _ in range(3))
    var = torch.rand(c, generator=g) + 0.1
    x = torch.randn(4, c, 6, 7, generator=g, requires_grad=True)
    ref = _frozen_reference(x.detach(), w, b, mean, var, eps)

    # loaded from a BatchNorm state dict (num_batches_tracked is dropped, not an error)
    bn = nn.BatchNorm2d(c, eps=eps)
    bn.load_state_dict({"weight": w, "bias": b, "running_mean": mean, "running_var": var,
                        "num_batches_tracked": torch.tensor(9)})
    frozen = FrozenBatchNorm2d(c, eps=eps)
    frozen.load_state_dict(bn.state_dict())
    converted = freeze_batchnorm(nn.Sequential(nn.Identity(), bn))[1]
    for layer in (frozen, converted):
        assert isinstance(layer, FrozenBatchNorm2d)
        assert list(layer.parameters()) == []  # nothing for the optimizer or AGVM's partition
        layer.train()  # training mode changes nothing
        y = layer(x)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        (gx,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(gx.double(), (w.double() / torch.sqrt(var.double() + eps))
                                   .view(1, -1, 1, 1).expand_as(gx), rtol=1e-5, atol=1e-6)
        assert all(not t.requires_grad and t.grad is None for t in layer.buffers())
    torch.testing.assert_close(frozen.running_var, var)
    # bf16 input keeps fp32 statistics, output in bf16
    out = frozen(x.detach().bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("norm", ["bn", "syncbn", "frozen_bn", "gn", "ln"])
def test_norm_option_builds_and_trains_one_step(norm):
    overrides = {"backbone.norm": norm, "neck.norm": norm, "head.norm": norm}
    torch.manual_seed(0)
    model = build_model(SPEC, overrides=overrides)  # validates the AGVM partition too
    kinds = {"bn": nn.BatchNorm2d, "syncbn": nn.SyncBatchNorm, "frozen_bn": FrozenBatchNorm2d,
             "gn": nn.GroupNorm, "ln": nn.LayerNorm}
    assert sum(isinstance(m, kinds[norm]) for m in model.modules()) >= 10, norm
    if norm != "bn":
        assert not any(type(m).__name__ == "BatchNorm2d" for m in model.modules()), norm
    from agvm_ds.report import partition_report

    report = partition_report(model, {"optimizer": {"type": "SGD"}}, 2)
    assert report["unassigned_params"] == 0 and not report["problems"]
    assert report["total_params"] == sum(p.numel() for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    images, targets = make_batch()
    model.train()
    loss = sum(model(images, targets).values())
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.endswith(".weight") for k in changed), norm
    frozen = {k for k, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert not any(k.rsplit(".", 1)[0] in frozen for k in changed), norm  # nothing frozen moved
    stats = {k for k in changed if k.endswith("running_mean")}
    assert bool(stats) == (norm in ("bn", "syncbn")), (norm, sorted(stats)[:3])


def test_timm_backbone_norm_is_converted():
    spec = {"name": "t", "architecture": "retinanet", "num_classes": 3,
            "backbone": {"type": "timm", "name": "resnet18", "norm": "frozen_bn"},
            "neck": {"out_channels": 32, "extra_levels": 0}, "head": {"num_convs": 1}}
    model = build_model(spec)
    body = model.backbone.body
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in body.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == 20  # resnet18's BNs
    model = build_model(spec, overrides={"backbone.norm": "syncbn"})
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.backbone.body.modules()) == 20


@pytest.mark.parametrize("key,named", [("backbone.norm", "backbone.uninet.norm"),
                                       ("neck.norm", "neck.norm"), ("head.norm", "head.norm")])
def test_unknown_norm_is_a_config_error_naming_the_key(key, named):
    with pytest.raises(ConfigError) as err:
        load_spec(SPEC, {key: "batchnorm"})
    assert f"{named}: Input should be" in str(err.value) and "\n" not in str(err.value)
    # a timm backbone converts BatchNorms only: GroupNorm is not one of its options
    with pytest.raises(ConfigError, match=r"backbone\.timm\.norm: Input should be"):
        load_spec({"name": "t", "architecture": "retinanet",
                   "backbone": {"type": "timm", "name": "resnet18", "norm": "gn"}})


# ---------------------------------------------------------------- 2 gloo ranks
def _stats(seed: int, c: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5, 3 + seed % 7


def _bn_zoo():
    return nn.ModuleDict({"a": nn.BatchNorm2d(3), "b": nn.BatchNorm1d(4), "sync": nn.SyncBatchNorm(2),
                          "frozen": FrozenBatchNorm2d(3), "untracked": nn.BatchNorm2d(2, track_running_stats=False),
                          "c": nn.BatchNorm2d(5)})


def _average_on_ranks(rank, world):
    import torch.distributed as dist

    zoo = _bn_zoo()
    with torch.no_grad():
        for i, (name, m) in enumerate(zoo.items()):
            if getattr(m, "running_mean", None) is not None:
                mean, var, steps = _stats(100 * rank + i, m.num_features)
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if hasattr(m, "num_batches_tracked"):
                    m.num_batches_tracked.fill_(steps)
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (calls.append(t.numel()), real(t, *a, **k))[1]
    try:
        count = average_batchnorm_statistics(zoo)
    finally:
        dist.all_reduce = real
    # torch's SyncBatchNorm on CPU: its training forward refuses to run on more than one rank
    try:
        nn.SyncBatchNorm(2)(torch.randn(2, 2, 3, 3))
        sync_cpu = "ran"
    except ValueError as err:
        sync_cpu = str(err)
    return {"count": count, "calls": calls, "sync_cpu": sync_cpu,
            "state": {k: v.clone() for k, v in zoo.state_dict().items()}}


def test_batchnorm_statistics_averaged_across_two_ranks():
    world = 2
    results = run_distributed(_average_on_ranks, world)
    zoo = _bn_zoo()
    for rank, res in enumerate(results):
        assert res["count"] == 3  # a, b, c; not SyncBN, frozen or untracked
        assert res["calls"] == [2 * (3 + 4 + 5) + 3]  # ONE flat collective
        assert "GPU" in res["sync_cpu"]
        state = res["state"]
        for i, (name, m) in enumerate(zoo.items()):
            if name in ("a", "b", "c"):
                per_rank = [_stats(100 * r + i, m.num_features) for r in range(world)]
                for j, key in enumerate(("running_mean", "running_var")):
                    ref = sum(s[j].double() for s in per_rank) / world
                    torch.testing.assert_close(state[f"{name}.{key}"].double(), ref, rtol=1e-6, atol=1e-7)
                steps = [s[2] for s in per_rank]
                assert int(state[f"{name}.num_batches_tracked"]) == round(sum(steps) / world)
            elif name in ("sync", "frozen"):  # this rank's own values, untouched
                mean, var, _ = _stats(100 * rank + i, m.num_features)
                assert torch.equal(state[f"{name}.running_mean"], mean)
                assert torch.equal(state[f"{name}.running_var"], var)
    # the ranks started from different statistics (else the check above proves nothing)
    assert not torch.equal(_stats(0, 3)[0], _stats(100, 3)[0])
