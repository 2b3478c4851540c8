"""What an inferred partition means for AGVM (issue 31 item 9): wrappers are looked through,
stray top-level parameters join the anchor (within STRAY_SHARE of its elements), and a cut
into one module warns that AGVM will modulate nothing — through ``initialize``'s partition
step, the report and ``launch/partition.py``.

Expectations come from the unwrapped model's own partition or from ``named_parameters``
directly, never from counts written here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import agvm_ds
from agvm_ds.api import build_partition
from agvm_ds.config.agvm import AGVMConfig
from agvm_ds.partition import resolve_partition
from agvm_ds.partition_infer import STRAY_SHARE
from agvm_ds.report import format_report, partition_report


class _Wrap(nn.Module):
    """A wrapper holding one model under ``name`` (``net``, DDP's ``module``)."""

    def __init__(self, name, inner, **params):
        super().__init__()
        setattr(self, name, inner)
        for key, value in params.items():
            setattr(self, key, nn.Parameter(value))


class _Seq(nn.Module):
    """A module tree from a dict: ``{"a": {"b": 3}}`` → ``self.a.b = Linear(3, 3)``."""

    def __init__(self, tree):
        super().__init__()
        for name, sub in tree.items():
            setattr(self, name, _Seq(sub) if isinstance(sub, dict) else nn.Linear(sub, sub))


DETR = {"backbone": {"body": 40}, "input_proj": 3, "transformer": {"encoder": {"layers": 3}, "decoder": {"layers": 3}},
        "class_embed": 3, "bbox_embed": {"layers": 3}, "query_embed": 2}


@pytest.fixture(scope="module")
def fasterrcnn():
    from torchvision.models import detection as det  # after agvm_ds: the import order documented

    with torch.device("meta"):
        return det.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)


def _numel_under(model, prefix):
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix))


def test_a_wrapped_detector_is_looked_through_nested_too(fasterrcnn):
    plain = resolve_partition(fasterrcnn)
    for path, model in (("net", _Wrap("net", fasterrcnn)), ("module.net", _Wrap("module", _Wrap("net", fasterrcnn)))):
        inferred = agvm_ds.infer_partition(model)
        assert inferred.inside == path and inferred.name == f"{plain.source} inside {path!r}", inferred.name
        part = resolve_partition(model)
        assert part.order == plain.order and part.anchor == plain.anchor and part.source == inferred.name
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert list(part.owner) == trainable
        for name, module in part.owner.items():  # the wrapped model's own cut, under the wrapper's prefix
            assert plain.owner[name.removeprefix(path + ".")] == module, name
        assert partition_report(model)["layout"].endswith(f"inside {path!r}")
    # no layout inside either: the generic fallback cuts the wrapped model's children, and says where
    generic = agvm_ds.infer_partition(_Wrap("net", _Seq({"stem": 3, "head": {"cls": 3}})))
    assert generic.generic and generic.name == "generic inside 'net'"
    assert dict(generic.modules) == {"stem": ["net.stem."], "head": ["net.head."]}


def test_stray_top_level_parameters_join_the_anchor_within_their_share(capsys):
    model = _Seq(DETR)
    model.logit_scale = nn.Parameter(torch.ones(()))
    inferred = agvm_ds.infer_partition(model)
    assert not inferred.generic and inferred.layout.startswith("DETR") and inferred.anchor == "backbone"
    part = resolve_partition(model)
    assert part.owner["logit_scale"] == "backbone" and list(part.owner) == [n for n, _ in model.named_parameters()]
    assert len(inferred.notes) == 1 and inferred.notes[0].startswith(
        "1 stray top-level parameter(s) (logit_scale; 1 element(s)) join the anchor 'backbone'")
    build_partition(model, None, AGVMConfig())
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"[agvm-ds] agvm modules: {inferred.notes[0]}" and len(out) == 2
    assert f"note: {inferred.notes[0]}" in format_report(partition_report(model))

    # the limit: strays together up to STRAY_SHARE of the anchor's elements; one more rejects the layout
    anchor = _numel_under(model, "backbone.")
    at_limit = int(STRAY_SHARE * anchor)
    model.logit_scale = nn.Parameter(torch.ones(at_limit - 1))  # with `temperature` below: exactly the limit
    wrapped = _Wrap("module", model, temperature=torch.ones(()))  # a wrapper's own parameter is a stray too
    part = resolve_partition(wrapped)
    assert part.owner["temperature"] == part.owner["module.logit_scale"] == "backbone"
    assert part.source == "DETR (backbone, transformer encoder / decoder, class and box heads) inside 'module'"
    model.logit_scale = nn.Parameter(torch.ones(at_limit))
    over = agvm_ds.infer_partition(wrapped)
    assert over.generic and any(f"more than 1% of anchor 'backbone'" in why for _, why in over.rejected)
    # the fallback keeps strays that large as modules of their own
    assert over.name == "generic inside 'module'" and over.notes == ()
    assert over.modules["temperature"] == ["temperature."]
    assert over.modules["module.logit_scale"] == ["module.logit_scale."]


def test_a_frozen_anchor_hands_over_and_says_so():
    model = _Seq(DETR)
    model.backbone.requires_grad_(False)
    inferred = agvm_ds.infer_partition(model)
    assert inferred.anchor == "encoder" and "backbone" not in inferred.modules
    assert inferred.notes == ("the layout's anchor 'backbone' holds no trainable parameter (frozen?); "
                              "'encoder' anchors instead",)


SINGLE = ("warning: agvm modules: every trainable parameter is in one module ({!r}): AGVM will modulate "
          "nothing (the anchor's multiplier is 1 by definition); name two or more modules for it to act")


def test_a_cut_into_one_module_warns_that_agvm_modulates_nothing(capsys):
    backbone = _Seq({"stem": 4, "stages": {"a": 4, "b": 4}})
    build_partition(backbone, {"backbone": ["stem.", "stages."]}, AGVMConfig())
    err = capsys.readouterr().err.splitlines()
    assert err == [SINGLE.format("backbone")]
    report = partition_report(backbone, modules={"backbone": [""]})
    assert report["warnings"] == [SINGLE.format("backbone").removeprefix("warning: ")] and report["problems"] == []
    assert SINGLE.format("backbone") in format_report(report).splitlines()
    # inferred: a wrapper around one layer is one module (a layer is not looked into)
    build_partition(_Wrap("proj", nn.Linear(4, 4)), None, AGVMConfig())
    assert SINGLE.format("proj") in capsys.readouterr().err.splitlines()
    # two modules: no warning
    build_partition(backbone, {"stem": ["stem."], "stages": ["stages."]}, AGVMConfig())
    assert capsys.readouterr().err == ""


def test_partition_cli_shows_the_one_module_warning(capsys):
    path = Path(__file__).resolve().parents[1] / "launch" / "partition.py"
    spec = importlib.util.spec_from_file_location("partition_cli_meaning", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--model", "torch.nn.Linear", "--model_kwargs", '{"in_features": 8, "out_features": 2}']
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert SINGLE.format("Linear") in text.splitlines() and "modules inferred: generic" in text
    assert cli.main(args + ["--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["warnings"] == [SINGLE.format("Linear").removeprefix("warning: ")]
    assert SINGLE.format("Linear") in err.splitlines()
