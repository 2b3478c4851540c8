"""Every shipped spec validates and builds; partitions and param groups obey the contract."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import agvm_ds  # noqa: F401  (torchvision compat before timm)
from agvm_ds.config.base import parse_section
from agvm_ds.errors import ConfigError
from agvm_ds.config.model import ModelConfig
from agvm_ds.models import build_model, load_spec
from agvm_ds.config.spec import ARCHITECTURE_SECTIONS
from agvm_ds.partition import param_groups, resolve_partition

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "models").glob("*.json"))
EXPECTED_MODULES = {
    "retinanet": ["backbone", "neck", "head"],
    "faster_rcnn": ["backbone", "neck", "rpn", "roi_box"],
    "mask_rcnn": ["backbone", "neck", "rpn", "roi_box", "roi_mask"],
    "semantic_fpn": ["backbone", "neck", "decode"],
}


def _owners(model):
    """Independent check: which module prefixes each trainable parameter name matches."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = [m for m, prefixes in model.agvm_modules.items()
                         if any(name == q or name.startswith(q.rstrip(".") + ".") for q in prefixes)]
    return out


def test_all_architectures_have_specs():
    archs = {json.loads(p.read_text())["architecture"] for p in SPECS}
    assert archs == set(ARCHITECTURE_SECTIONS)
    assert len(SPECS) >= 8


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_spec_validates_and_builds_on_meta(path):
    spec = load_spec(path)
    assert spec.name == path.stem  # file name and spec name agree
    with torch.device("meta"):
        model = build_model(path)
    assert list(model.agvm_modules) == EXPECTED_MODULES[spec.architecture]
    assert model.agvm_anchor == "backbone" == next(iter(model.agvm_modules))
    owners = _owners(model)
    assert owners and all(len(o) == 1 for o in owners.values())
    for m in model.agvm_modules:
        assert any(o == [m] for o in owners.values()), f"module {m} owns nothing"
    # the anchor's params are exactly the backbone's
    assert {n for n, o in owners.items() if o == ["backbone"]} == \
        {f"backbone.{n}" for n, _ in model.backbone.named_parameters()}


def test_uninet_1b_backbone_size():
    with torch.device("meta"):
        model = build_model("models/mask_rcnn_uninet_1b.json")
    n = sum(p.numel() for p in model.backbone.parameters())
    assert 0.97e9 <= n <= 1.03e9, n
    spec = load_spec("mask_rcnn_uninet_1b")
    st = spec.backbone.stages
    assert [s.channels for s in st] == [128, 256, 512, 768, 768, 1536]
    assert [s.depth for s in st] == [4, 6, 12, 12, 12, 24]
    assert [s.expansion for s in st] == [1, 4, 6, 3, 2, 5]
    assert [s.stride for s in st] == [1, 2, 2, 2, 1, 2]
    assert [s.block for s in st] == ["fused_mbconv"] * 2 + ["mbconv"] * 2 + ["attention"] * 2
    assert spec.backbone.head_dim == 64 and spec.backbone.stem_channels == 96
    assert model.backbone.strides == [4, 8, 16, 32]


def _tiny(**changes):
    d = json.loads((REPO / "models" / "retinanet_uninet_tiny.json").read_text())
    for k, v in changes.items():
        d[k] = v
    return d


@pytest.mark.parametrize("modules,message", [
    ({"backbone": ["backbone"], "neck": ["neck"]}, "belong to no module"),
    ({"backbone": ["backbone"], "neck": ["neck"], "head": ["head"], "extra": ["nothing_here"]},
     "'extra'"),
    ({"backbone": ["backbone"], "neck": ["neck"], "head": ["head"], "cls": ["head"]},
     "several modules"),
])
def test_bad_partitions_are_rejected(modules, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_model(_tiny(modules=modules))
    assert "modules" in str(err.value)


def test_nested_prefix_goes_to_the_longest_match():
    # The one partition rule (agvm_ds.partition), shared by training and the report.
    model = build_model(_tiny(modules={"backbone": ["backbone"], "neck": ["neck"], "head": ["head"],
                                       "cls": ["head.cls_logits"]}))
    from agvm_ds.models import assign_modules

    owners = assign_modules(model)
    assert owners["cls"] and all(n.startswith("head.cls_logits.") for n in owners["cls"])
    assert owners["head"] and not any(n.startswith("head.cls_logits.") for n in owners["head"])
    assert not owners["<unassigned>"] and not owners["<ambiguous>"]


def test_finer_partition_is_accepted():
    model = build_model(_tiny(modules={"backbone": ["backbone.stem", "backbone.stages", "backbone.out_norms"],
                                       "neck": ["neck"], "head_cls": ["head.cls_tower", "head.cls_logits"],
                                       "head_box": ["head.box_tower", "head.box_deltas"]},
                              anchor="neck"))
    assert list(model.agvm_modules)[0] == "neck" and model.agvm_anchor == "neck"


@pytest.mark.parametrize("change,key", [
    ({"architecture": "yolo"}, "architecture"),
    ({"head": {"num_convs": -1}}, "head.num_convs"),
    ({"head": {"nms_tresh": 0.5}}, "head.nms_tresh"),
    ({"rpn": {}}, "rpn"),
    ({"anchor": "decoder"}, "anchor"),
    ({"bogus": 1}, "bogus"),
    ({"backbone": {"type": "uninet", "stem_channels": 8, "out_indices": [0],
                   "stages": [{"block": "conv", "channels": 8, "depth": 1, "expansion": 1, "stride": 1}]}},
     "block"),
    ({"backbone": {"type": "uninet", "stem_channels": 8, "out_indices": [0, 1],
                   "stages": [{"block": "mbconv", "channels": 8, "depth": 1, "expansion": 1, "stride": 1}]}},
     "out_indices"),
])
def test_spec_errors_name_the_key(change, key):
    with pytest.raises(ConfigError) as err:
        load_spec(_tiny(**change))
    assert key in str(err.value)


def test_model_config_section():
    cfg = parse_section(ModelConfig, {"spec": "models/faster_rcnn_uninet_tiny.json", "num_classes": 4,
                                      "overrides": {"roi_box.fc_dim": 32}}, "model")
    model = build_model(cfg)
    assert model.num_classes == 4 and model.roi_box.cls_score.out_features == 5
    assert model.roi_box.cls_score.in_features == 32
    absolute = parse_section(ModelConfig, {"spec": str(REPO / "models/faster_rcnn_uninet_tiny.json"),
                                           "num_classes": 2}, "model")
    assert absolute.model_spec().num_classes == 2
    for bad, key in [({"spec": "models/none.json", "num_classes": 3}, "model.spec"),
                     ({"spec": "models/faster_rcnn_uninet_tiny.json"}, "model.num_classes"),
                     ({"spec": "models/faster_rcnn_uninet_tiny.json", "num_classes": 3,
                       "overrides": {"roi_box.fcdim": 3}}, "roi_box.fcdim"),
                     ({"spec": "models/faster_rcnn_uninet_tiny.json", "num_classes": 3, "x": 1}, "model.x")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_section(ModelConfig, bad, "model")


def test_backbone_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(1)
    src = build_model("semantic_fpn_uninet_tiny")
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": src.backbone.state_dict()}, path)
    cfg = parse_section(ModelConfig, {"spec": "semantic_fpn_uninet_tiny", "num_classes": 7,
                                      "backbone_checkpoint": str(path)}, "model")
    dst = build_model(cfg)
    for (n, a), (_, b) in zip(src.backbone.state_dict().items(), dst.backbone.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(ConfigError, match="backbone.checkpoint"):
        build_model("semantic_fpn_uninet_tiny", overrides={"backbone.checkpoint": str(tmp_path / "no.pth")})


@pytest.mark.parametrize("spec", ["semantic_fpn_uninet_tiny", "retinanet_resnet18"])
def test_a_pickled_backbone_checkpoint_is_refused_in_one_line_without_running(tmp_path, spec):
    """Issue 31 item 8: a torch.save pickle holding an object (not only tensors) was six lines
    of torch's UnpicklingError (UniNet) or a 'backbone.name: timm cannot build' (timm); a file
    that is no checkpoint was a bare KeyError. Nothing in either file runs."""
    import os

    from agvm_ds.config.run import load_run_config
    from agvm_ds.train.build import build_model as build_run_model
    from test_after_training_inputs import RUN, _Planted

    ran = tmp_path / "code_ran"
    planted, junk = tmp_path / "planted.pth", tmp_path / "junk.pth"
    torch.save({"state_dict": {"stem.weight": _Planted(ran)}}, planted)
    junk.write_bytes(b"not a checkpoint at all")
    for path, why in ((planted, "holds pickled Python objects, refused without loading them"),
                      (junk, "is neither safetensors nor a torch.save file")):
        with pytest.raises(ConfigError) as err:
            build_model(spec, num_classes=3, overrides={"backbone.checkpoint": str(path)})
        assert str(err.value).startswith(f"backbone.checkpoint: {path} {why}")
        assert "\n" not in str(err.value)
        assert not ran.exists()
    # the run file's model.backbone_checkpoint, as training builds it
    config = tmp_path / "run.json"
    semantic = spec.startswith("semantic")  # the embedded semantic benchmark counts the background
    model = {"spec": f"models/{spec}.json", "num_classes": 7 if semantic else 6,
             "backbone_checkpoint": str(planted)}
    data = {**RUN["data"], "task": "semantic" if semantic else "detection"}
    config.write_text(json.dumps({**RUN, "model": model, "data": data, "train": {"max_steps": 1}}))
    with pytest.raises(ConfigError, match=f"^backbone.checkpoint: {planted} holds pickled"):
        build_run_model(load_run_config(config, [], world_size=1))
    assert not ran.exists()


def test_param_groups_decay_split_per_module():
    model = build_model("mask_rcnn_uninet_tiny")
    groups = param_groups(model, resolve_partition(model), 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter exactly once
    assert [g["module"] for g in groups][::2] == list(model.agvm_modules)  # anchor first
    norm_types = (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    norm_params = {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, norm_types)
                   for pn, _ in m.named_parameters(recurse=False)}
    for g in groups:
        assert set(g) == {"params", "weight_decay", "module"}
        for p in g["params"]:
            n = names[id(p)]
            assert n.startswith(g["module"] + ".")
            no_decay = n in norm_params or n.endswith(".bias") or p.ndim <= 1
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), n
    # at most two groups per module; equal hyper-parameters merge into one
    assert len(groups) == 2 * len(model.agvm_modules)
    merged = param_groups(model, resolve_partition(model), 0.05, weight_decay_norm=0.05,
                          weight_decay_bias=0.05, lr=0.1)
    assert len(merged) == len(model.agvm_modules) and all(g["lr"] == 0.1 for g in merged)
    with pytest.raises(ValueError, match="no single module"):
        param_groups(model, resolve_partition(model, {"backbone": ["backbone"]}), 0.05)


def test_uninet_blocks_shapes_and_checkpointing():
    from agvm_ds.config.spec import UniNetSpec
    from agvm_ds.models.backbones import build_backbone

    d = copy.deepcopy(load_spec("faster_rcnn_uninet_tiny").backbone.model_dump())
    d["stages"][3]["block"] = "mlp"  # exercise the mixer (window 4 on a 4x6 map: padded)
    d["stages"][3]["window"] = 4
    torch.manual_seed(0)
    bb = build_backbone(UniNetSpec.model_validate(d)).eval()
    x = torch.randn(2, 3, 64, 96)
    feats = bb(x)
    assert bb.strides == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 96 // s) for c, s in zip(bb.channels, bb.strides)]
    assert any(type(m).__name__ == "ContextDownsample" and m.context for m in bb.modules())
    bb.train()
    bb.grad_checkpointing = True
    torch.manual_seed(1)
    a = sum(f.sum() for f in bb(x))
    a.backward()
    g1 = [p.grad.clone() for p in bb.parameters()]
    bb.zero_grad()
    bb.grad_checkpointing = False
    torch.manual_seed(1)
    b = sum(f.sum() for f in bb(x))
    b.backward()
    torch.testing.assert_close(a, b)
    for p, g in zip(bb.parameters(), g1):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_timm_backbone_local_checkpoint_and_convnext(tmp_path):
    """Pretrained weights come from a local file only; ConvNeXt works through features_only."""
    import timm

    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False)  # a classifier checkpoint
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    model = build_model("retinanet_resnet18", num_classes=3, overrides={"backbone.checkpoint": str(path)})
    loaded = model.backbone.body.state_dict()
    reference = full.state_dict()
    assert loaded and all(torch.equal(v, reference[k]) for k, v in loaded.items())
    with pytest.raises(ConfigError, match="backbone.checkpoint"):
        build_model("retinanet_resnet18", overrides={"backbone.checkpoint": str(tmp_path / "none.pth")})
    with pytest.raises(ConfigError, match="backbone.name"):
        build_model("retinanet_resnet18", overrides={"backbone.name": "no_such_model_xyz"})

    conv = build_model("retinanet_resnet18", num_classes=3,
                       overrides={"backbone": {"type": "timm", "name": "convnext_atto"}})
    assert conv.backbone.strides == [4, 8, 16, 32] and not conv.backbone.nhwc
    feats = conv.backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == conv.backbone.channels


def test_training_groups_and_report_groups_agree_on_decay():
    """The groups training builds (train.build) and the ones the partition report lists
    (agvm_ds.partition.param_groups) exempt the same parameters from weight decay —
    including Swin's relative-position tables, which are 2-d and named, not norms or biases."""
    from agvm_ds.train.build import build_param_groups as training_groups

    model = build_model("mask_rcnn_swin_tiny")
    names = {id(p): n for n, p in model.named_parameters()}
    tables = [n for n in names.values() if n.endswith("relative_position_bias_table")]
    assert tables  # the case this test is about exists in the model

    def exempt(groups):
        return {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    trained = exempt(training_groups(model, resolve_partition(model), 0.05, 1e-3))
    assert set(tables) <= trained
    assert trained == exempt(param_groups(model, resolve_partition(model), 0.05))
