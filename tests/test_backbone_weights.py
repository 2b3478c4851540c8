"""model.backbone_checkpoint: timm, torchvision, own-export and prefixed layouts; frozen_bn keeps
the checkpoint's statistics (outputs checked against the source classifier's own eval forward);
pickles, misfits and bad shapes refused in one line naming the file. Tiny random models only."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

import agvm_ds  # noqa: F401  (torchvision compat before timm)
from agvm_ds.config import parse_section
from agvm_ds.config.model import ModelConfig
from agvm_ds.config.spec import TimmBackboneSpec, load_spec
from agvm_ds.errors import ConfigError
from agvm_ds.inference.model_dir import backbone_state
from agvm_ds.models import build_model
from agvm_ds.models.backbones import build_backbone, load_backbone_weights
from agvm_ds.models.norms import FrozenBatchNorm2d

LAYERS = [1, 1, 1, 1]  # a ResNet-10-sized "resnet18": same key layout, a quarter of the blocks


def _randomize_bn(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine (fresh ones are 0/1, which hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def _resnet_reference(model, relu_name: str, x: torch.Tensor) -> list[torch.Tensor]:
    """layer2..layer4 of a classification ResNet, called module by module (eval mode)."""
    x = model.maxpool(getattr(model, relu_name)(model.bn1(model.conv1(x))))
    outs = []
    for i in range(1, 5):
        x = getattr(model, f"layer{i}")(x)
        outs.append(x)
    return outs[1:]


def _timm_backbone(path, norm="frozen_bn"):
    spec = TimmBackboneSpec(type="timm", name="resnet18", out_indices=[2, 3, 4], norm=norm,
                            kwargs={"layers": LAYERS}, checkpoint=str(path))
    return build_backbone(spec).double().eval()


def _check_frozen_output(backbone, reference: list[torch.Tensor], x: torch.Tensor) -> None:
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    with torch.no_grad():
        out = backbone(x)
    assert len(out) == len(reference)
    for a, b in zip(out, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_timm_layout_frozen_bn_equals_source_eval(tmp_path):
    import timm

    torch.manual_seed(0)
    src = _randomize_bn(timm.create_model("resnet18", layers=LAYERS, num_classes=10), 1)
    path = tmp_path / "timm_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    src.double()  # exact: both sides widen the same fp32 values
    bb = _timm_backbone(path)
    r = bb.weights_report
    print(r.line())
    assert (r.strip, r.add, r.missing, sorted(r.unexpected)) == ("", "", [], ["fc.bias", "fc.weight"])
    assert r.loaded == r.total == sum(not k.endswith("num_batches_tracked") for k in src.state_dict()) - 2
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        ref = _resnet_reference(src, "act1", x)
    _check_frozen_output(bb, ref, x)


def test_torchvision_layout_weights_only_pt(tmp_path):
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    src = _randomize_bn(ResNet(BasicBlock, LAYERS, num_classes=10), 2)
    path = tmp_path / "tv_resnet.pt"
    torch.save(src.state_dict(), path)
    src.double()
    bb = _timm_backbone(path)
    r = bb.weights_report
    print(r.line())
    assert (r.strip, r.missing, r.unexpected, r.loaded) == ("", [], ["fc.weight", "fc.bias"], r.total)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = _resnet_reference(src, "relu", x)
    _check_frozen_output(bb, ref, x)
    # trainable BatchNorm ("bn") starts from the checkpoint's statistics too
    bn = _timm_backbone(path, norm="bn")
    assert torch.equal(bn.body.bn1.running_var, src.bn1.running_var)


@pytest.mark.parametrize("prefix", ["module.", "model.", "backbone.", "module.backbone."])
def test_prefixed_state_dict_is_mapped(tmp_path, prefix):
    torch.manual_seed(0)
    spec = load_spec("semantic_fpn_uninet_tiny").backbone
    src = _randomize_bn(build_backbone(spec), 3)
    path = tmp_path / "prefixed.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    dst = build_backbone(spec)
    r = load_backbone_weights(path, dst)
    assert (r.strip, r.missing, r.unexpected, r.outside) == (prefix, [], [], 0)
    assert f"key prefix {prefix!r} stripped" in r.line()
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), n


def test_wrapper_prefix_is_added(tmp_path):
    """A backbone whose every tensor sits under one wrapper name (as in timm's getter wrapper)
    takes the unwrapped model's keys."""
    torch.manual_seed(0)
    spec = load_spec("semantic_fpn_uninet_tiny").backbone
    src = build_backbone(spec)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    wrapper = torch.nn.Module()
    wrapper.model = build_backbone(spec)
    r = load_backbone_weights(tmp_path / "w.safetensors", wrapper)
    assert (r.strip, r.add, r.missing, r.unexpected) == ("", "model.", [], [])
    assert "key prefix '' -> 'model.'" in r.line()
    for (n, a), (_, b) in zip(src.state_dict().items(), wrapper.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_own_export_files_uninet_frozen_bn(tmp_path):
    """A whole-network model.safetensors (prefix 'backbone.') and backbone.safetensors, as
    launch/export.py writes them; into a frozen_bn UniNet whose output then equals the bn
    source's eval output."""
    torch.manual_seed(0)
    src = build_model("semantic_fpn_uninet_tiny")
    _randomize_bn(src, 4)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    save_file(backbone_state(src, state), str(tmp_path / "backbone.safetensors"))
    outside = sum(not k.startswith("backbone.") for k in state)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = src.backbone(x)
    for name, strip, n_out in [("model.safetensors", "backbone.", outside), ("backbone.safetensors", "", 0)]:
        cfg = parse_section(ModelConfig, {"spec": "semantic_fpn_uninet_tiny", "num_classes": 7,
                                          "overrides": {"backbone.norm": "frozen_bn"},
                                          "backbone_checkpoint": str(tmp_path / name)}, "model")
        dst = build_model(cfg).eval()
        r = dst.backbone.weights_report
        print(r.line())
        assert (r.strip, r.missing, r.unexpected, r.outside) == (strip, [], [], n_out)
        assert n_out == 0 or f"{n_out} outside 'backbone.' ignored" in r.line()
        assert any(isinstance(m, FrozenBatchNorm2d) for m in dst.backbone.modules())
        with torch.no_grad():
            out = dst.backbone(x)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_own_export_timm_whole_network(tmp_path):
    torch.manual_seed(0)
    overrides = {"backbone.kwargs": {"layers": LAYERS}}
    src = build_model("retinanet_resnet18", num_classes=3, overrides=overrides)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    dst = build_model("retinanet_resnet18", num_classes=3,
                      overrides={**overrides, "backbone.checkpoint": str(tmp_path / "model.safetensors")})
    r = dst.backbone.weights_report
    assert (r.strip, r.missing, r.unexpected) == ("backbone.body.", [], [])
    for k, v in dst.backbone.state_dict().items():
        assert torch.equal(v, state["backbone." + k]), k


class _NotATensor:  # a pickled object that weights-only loading must refuse
    pass


def test_refusals_are_one_line_naming_the_file(tmp_path):
    spec = load_spec("semantic_fpn_uninet_tiny").backbone
    good = build_backbone(spec).state_dict()
    cases = {}
    cases["pickle.pt"] = lambda p: torch.save({"stem.0.weight": _NotATensor()}, p)
    cases["garbage.bin"] = lambda p: p.write_bytes(b"not weights at all")
    cases["damaged.pt"] = lambda p: p.write_bytes(b"PK\x03\x04 truncated")
    cases["misfit.safetensors"] = lambda p: save_file(
        {k: v for i, (k, v) in enumerate(good.items()) if i % 3 == 0}, str(p))  # a third of it
    bad = dict(good)
    bad["stem.0.weight"] = torch.zeros(3, 3, 3, 3)
    cases["shape.safetensors"] = lambda p: save_file({k: v.contiguous() for k, v in bad.items()}, str(p))
    expected = {"pickle.pt": "pickled Python objects", "garbage.bin": "neither safetensors",
                "damaged.pt": "damaged torch file", "misfit.safetensors": "does not fit this backbone",
                "shape.safetensors": "'stem.0.weight' has shape [3, 3, 3, 3]"}
    for name, write in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(ConfigError) as err:
            load_backbone_weights(path, build_backbone(spec))
        msg = str(err.value)
        print(msg)
        assert msg.startswith("backbone.checkpoint: ") and str(path) in msg, msg
        assert expected[name] in msg and "\n" not in msg, msg
    # the pickled file really is a pickle: refused by weights-only loading, not by a name check
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "pickle.pt", weights_only=True)


def test_safetensors_whose_first_byte_looks_like_a_pickle(tmp_path):
    """A safetensors header length ending in byte 0x80 (pickle's opcode) is still safetensors."""
    from safetensors.torch import save

    spec = load_spec("semantic_fpn_uninet_tiny").backbone
    src = build_backbone(spec)
    tensors = {k: v.contiguous() for k, v in src.state_dict().items()}
    blob = next(b for b in (save(tensors, metadata={"pad": "x" * i}) for i in range(512)) if b[0] == 0x80)
    path = tmp_path / "w.safetensors"
    path.write_bytes(blob)
    r = load_backbone_weights(path, build_backbone(spec))
    assert (r.missing, r.unexpected, r.loaded) == ([], [], r.total)
