"""Partitions inferred from structure (agvm_ds.layouts) for models agvm-ds did not write.

torchvision's own detectors and segmenters are built with ``weights=None`` on the meta device
(shapes only); mmdetection-, detectron2- and DETR-style models are small stand-ins that copy
those libraries' attribute names. Every expectation is written out by hand: which module
owns which parameter-name prefix, and how many trainable parameters each module holds
(counted here directly from ``named_parameters``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import agvm_ds
from agvm_ds.api import build_partition
from agvm_ds.config.agvm import AGVMConfig
from agvm_ds.errors import ConfigError
from agvm_ds.partition import PartitionError, resolve_partition
from agvm_ds.report import format_report, partition_report


def _count(model, *starts, but=()):
    """Trainable parameters whose names start with one of ``starts`` and none of ``but``."""
    return sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and n.startswith(starts) and not n.startswith(tuple(but) or ("\0",)))


def _sizes(model, partition):
    out = {m: 0 for m in partition.order}
    params = dict(model.named_parameters())
    for name, module in partition.owner.items():
        out[module] += params[name].numel()
    return out


def _tv(builder, **kw):
    import torchvision.models.detection as det  # noqa: F401  (after agvm_ds: the import order documented)
    import torchvision.models.segmentation as seg  # noqa: F401

    with torch.device("meta"):
        return builder(weights=None, weights_backbone=None, **kw)


def test_torchvision_detectors_and_segmenters_get_their_layout():
    from torchvision.models import detection as det, segmentation as seg

    cases = {
        det.fasterrcnn_mobilenet_v3_large_fpn: ("backbone", "fpn", "rpn", "roi_box"),
        det.maskrcnn_resnet50_fpn: ("backbone", "fpn", "rpn", "roi_box", "roi_mask"),
        det.keypointrcnn_resnet50_fpn: ("backbone", "fpn", "rpn", "roi_box", "roi_keypoint"),
        det.retinanet_resnet50_fpn: ("backbone", "fpn", "cls_head", "reg_head"),
        det.fcos_resnet50_fpn: ("backbone", "fpn", "cls_head", "reg_head"),
    }
    for builder, order in cases.items():
        model = _tv(builder)
        part = resolve_partition(model)
        assert part.order == order and part.anchor == "backbone", (builder.__name__, part.order)
        assert part.source == agvm_ds.infer_partition(model).layout and part.source.startswith("torchvision")
        sizes = _sizes(model, part)
        assert sizes["backbone"] == _count(model, "backbone.body.")
        assert sizes["fpn"] == _count(model, "backbone.fpn.") > 0
        if "rpn" in sizes:
            assert sizes["rpn"] == _count(model, "rpn.head.")
            assert sizes["roi_box"] == _count(model, "roi_heads.box_head.", "roi_heads.box_predictor.")
        if "roi_mask" in sizes:
            assert sizes["roi_mask"] == _count(model, "roi_heads.mask_head.", "roi_heads.mask_predictor.")
        if "roi_keypoint" in sizes:
            assert sizes["roi_keypoint"] == _count(model, "roi_heads.keypoint_")
        if "cls_head" in sizes:
            assert sizes["cls_head"] == _count(model, "head.classification_head.")
            assert sizes["reg_head"] == _count(model, "head.regression_head.")
        assert sum(sizes.values()) == _count(model, "")
    fcn = _tv(seg.fcn_resnet50, aux_loss=True)
    part = resolve_partition(fcn)
    assert part.order == ("backbone", "classifier", "aux_classifier")
    assert _sizes(fcn, part)["aux_classifier"] == _count(fcn, "aux_classifier.") > 0
    # without the auxiliary head the module is dropped, not left empty
    assert resolve_partition(_tv(seg.deeplabv3_resnet50)).order == ("backbone", "classifier")


def test_frozen_backbone_stages_stay_out_and_modules_override_everything():
    from torchvision.models import detection as det

    model = _tv(det.fasterrcnn_resnet50_fpn)
    for name in ("conv1", "bn1", "layer1", "layer2"):  # what trainable_backbone_layers=2 freezes
        model.backbone.body.get_submodule(name).requires_grad_(False)
    part = resolve_partition(model)
    assert not any(n.startswith("backbone.body.layer2.") for n in part.owner)
    assert _sizes(model, part)["backbone"] == _count(model, "backbone.body.") > 0
    given = resolve_partition(model, {"trunk": ["backbone."], "heads": ["rpn.", "roi_heads."]})
    assert given.order == ("trunk", "heads") and given.source == "given"


class _Seq(nn.Module):
    """A module tree from a dict: ``{"a": {"b": 3}}`` → ``self.a.b = Linear(3, 3)``."""

    def __init__(self, tree):
        super().__init__()
        for name, sub in tree.items():
            setattr(self, name, _Seq(sub) if isinstance(sub, dict) else nn.Linear(sub, sub))


MMDET_MASK_RCNN = {"backbone": {"stem": 4, "layer1": 4}, "neck": {"lateral": 3}, "rpn_head": {"rpn_conv": 3},
                   "roi_head": {"bbox_roi_extractor": {"fuse": 2}, "bbox_head": {"fc": 5, "cls": 2},
                                "mask_head": {"convs": 3, "logits": 2}}}
MMSEG = {"backbone": {"stages": 4}, "decode_head": {"conv": 3}, "auxiliary_head": {"conv": 2}}
D2_MASK_RCNN = {"backbone": {"bottom_up": {"res2": 4, "res3": 4}, "fpn_lateral2": 3, "fpn_output2": 3},
                "proposal_generator": {"rpn_head": {"conv": 3}},
                "roi_heads": {"box_head": {"fc1": 5}, "box_predictor": {"cls_score": 2}, "mask_head": {"mask_fcn1": 3}}}
DETR = {"backbone": {"body": 4}, "input_proj": 3,
        "transformer": {"encoder": {"layers": 3}, "decoder": {"layers": 3, "norm": 2}},
        "class_embed": 3, "bbox_embed": {"layers": 3}, "query_embed": 2}


@pytest.mark.parametrize("tree,expected", [
    (MMDET_MASK_RCNN, {"backbone": ("backbone.",), "neck": ("neck.",), "rpn": ("rpn_head.",),
                       "roi_box": ("roi_head.bbox_roi_extractor.", "roi_head.bbox_head."),
                       "roi_mask": ("roi_head.mask_head.",)}),
    (MMSEG, {"backbone": ("backbone.",), "decode": ("decode_head.",), "auxiliary": ("auxiliary_head.",)}),
    (D2_MASK_RCNN, {"backbone": ("backbone.bottom_up.",), "fpn": ("backbone.fpn_",), "rpn": ("proposal_generator.",),
                    "roi_box": ("roi_heads.box_",), "roi_mask": ("roi_heads.mask_head.",)}),
    (DETR, {"backbone": ("backbone.",), "encoder": ("input_proj.", "transformer.encoder."),
            "decoder": ("transformer.decoder.", "query_embed."), "class_head": ("class_embed.",),
            "box_head": ("bbox_embed.",)}),
], ids=["mmdet_mask_rcnn", "mmseg", "detectron2_mask_rcnn", "detr"])
def test_stand_ins_with_library_attribute_names(tree, expected):
    model = _Seq(tree)
    inferred = agvm_ds.infer_partition(model)
    assert not inferred.generic and inferred.anchor == "backbone"
    part = resolve_partition(model)
    assert part.order == tuple(expected)
    for name, module in part.owner.items():
        want = [m for m, starts in expected.items() if name.startswith(starts)]
        assert want == [module], (name, module, want)
    assert len(part.owner) == sum(1 for _ in model.parameters())


def test_generic_fallback_says_so_and_anchors_on_backbone():
    model = _Seq({"stem": 3, "backbone": {"a": 3}, "head": {"b": 3}, "frozen": 2})
    model.frozen.requires_grad_(False)
    inferred = agvm_ds.infer_partition(model)
    assert inferred.generic and inferred.layout == "generic"
    assert list(inferred.modules) == ["backbone", "stem", "head"] and inferred.anchor == "backbone"
    # an mmdet-looking model whose extra parts the layout does not cover is rejected, with the reason
    assert inferred.rejected and "outside its modules" in inferred.rejected[0][1]
    report = partition_report(model)  # no .spec, no agvm_modules, no config
    assert report["layout"] == "generic" and report["problems"] == []
    assert "modules inferred: generic" in format_report(report)
    with pytest.raises(PartitionError, match="no trainable parameter"):
        agvm_ds.infer_partition(_Seq({"x": 2}).requires_grad_(False))


def test_a_mistyped_prefix_is_named_with_the_submodule_it_missed():
    from torchvision.models import detection as det

    model = _tv(det.fasterrcnn_mobilenet_v3_large_fpn)
    modules = {"backbone": ["backbone.body."], "neck": ["backbone.fnp."], "rpn": ["rpn."], "roi": ["roi_heads."]}
    with pytest.raises(ConfigError) as err:
        build_partition(model, modules, AGVMConfig())
    msg = str(err.value)
    assert msg.startswith("agvm modules: module 'neck': prefix 'backbone.fnp.' matches no parameter "
                          "(did you mean 'backbone.fpn.'?)"), msg
    assert "belong to no module: backbone.fpn." in msg  # the orphans follow
    report = partition_report(model, modules=modules)
    assert any("backbone.fnp." in p for p in report["problems"])


def test_two_modules_claiming_one_prefix_are_both_named():
    model = _Seq(MMDET_MASK_RCNN)
    same = {"backbone": ["backbone."], "neck": ["neck."], "rpn": ["rpn_head.", "roi_head."], "roi": ["roi_head."]}
    with pytest.raises(PartitionError, match=r"modules 'rpn' and 'roi' both claim prefix 'roi_head\.'"):
        resolve_partition(model, same)
    # the same path with and without its dot is the same claim
    tie = {"backbone": ["backbone"], "rest": ["neck.", "rpn_head.", "roi_head"], "roi": ["roi_head."]}
    with pytest.raises(PartitionError, match=r"modules 'rest' and 'roi' both claim prefix 'roi_head\.'"):
        resolve_partition(model, tie)


def test_partition_cli_prints_the_table_for_any_importable_model(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "launch" / "partition.py"
    spec = importlib.util.spec_from_file_location("partition_cli_any", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    code = cli.main(["--model", "torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn", "--json"])
    out = capsys.readouterr().out
    report = __import__("json").loads(out)
    assert code == 0 and report["layout"].startswith("torchvision R-CNN") and report["problems"] == []
    assert list(report["modules"]) == ["backbone", "fpn", "rpn", "roi_box"] and report["unassigned_params"] == 0
    assert cli.main(["--model", "torchvision.models.detection.no_such_builder"]) == 2
    assert capsys.readouterr().err.startswith("error: --model: cannot import 'torchvision.models.detection.no_such")
    assert cli.main([]) == 2 and "give --deepspeed_config or --model" in capsys.readouterr().err


# Hugging Face DETR family, built tiny from config (no download). transformers after agvm_ds.
_HF_BACKBONE = {"model_type": "resnet", "depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 64, 128], "embedding_size": 16}
_HF_SIZES = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, num_labels=3)


@pytest.fixture(scope="module")
def hf_detectors():
    transformers = pytest.importorskip("transformers")
    detr = transformers.DetrForObjectDetection(transformers.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=_HF_BACKBONE, decoder_layers=1,
        **_HF_SIZES))
    # two-stage with box refinement: the class / box heads hang inside the decoder
    deformable = transformers.DeformableDetrForObjectDetection(transformers.DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=_HF_BACKBONE, decoder_layers=2,
        num_feature_levels=2, encoder_n_points=2, decoder_n_points=2, two_stage=True, with_box_refine=True,
        **_HF_SIZES))
    rt_detr = transformers.RTDetrForObjectDetection(transformers.RTDetrConfig(
        backbone_config=transformers.RTDetrResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128],
                                                        embedding_size=16, out_features=["stage2", "stage3", "stage4"]),
        encoder_hidden_dim=32, decoder_layers=1, **_HF_SIZES))
    return {"detr": detr, "deformable": deformable, "rt_detr": rt_detr}


# a few parameters per model and the module each must land in (names checked to exist)
_HF_EXPECTED = {
    "detr": {"model.backbone.model.embedder.embedder.convolution.weight": "backbone",
             "model.input_projection.weight": "encoder", "model.encoder.layers.0.mlp.fc1.weight": "encoder",
             "model.query_position_embeddings.weight": "decoder", "model.decoder.layernorm.weight": "decoder",
             "class_labels_classifier.weight": "class_head", "bbox_predictor.layers.2.bias": "box_head"},
    "deformable": {"model.level_embed": "encoder", "model.input_proj.1.0.weight": "encoder",
                   "model.enc_output.weight": "encoder", "model.pos_trans.weight": "decoder",
                   "model.decoder.layers.1.mlp.fc2.weight": "decoder", "model.decoder.class_embed.2.weight": "class_head",
                   "model.decoder.bbox_embed.0.layers.0.weight": "box_head"},
    "rt_detr": {"model.backbone.model.embedder.embedder.0.convolution.weight": "backbone",
                "model.encoder_input_proj.0.0.weight": "encoder", "model.encoder.fpn_blocks.0.conv1.conv.weight": "encoder",
                "model.enc_output.0.weight": "encoder", "model.denoising_class_embed.weight": "decoder",
                "model.decoder_input_proj.0.0.weight": "decoder", "model.decoder.query_pos_head.layers.0.weight": "decoder",
                "model.decoder.class_embed.0.weight": "class_head", "model.enc_score_head.weight": "class_head",
                "model.decoder.bbox_embed.0.layers.1.weight": "box_head", "model.enc_bbox_head.layers.0.bias": "box_head"},
}


@pytest.mark.parametrize("which", ["detr", "deformable", "rt_detr"])
def test_hugging_face_detr_family_gets_its_layout(hf_detectors, which):
    model = hf_detectors[which]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    try:
        # transformers freezes a HF-ResNet backbone whole (it looks for 'stage.1', the stages are
        # 'stages.1'): train it here so the backbone module is exercised
        model.model.backbone.requires_grad_(True)
        inferred = agvm_ds.infer_partition(model)
        assert inferred.layout.startswith("Hugging Face DETR family"), inferred.layout
        part = resolve_partition(model)
        assert part.order == ("backbone", "encoder", "decoder", "class_head", "box_head") and part.anchor == "backbone"
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert list(part.owner) == trainable  # every trainable parameter has its module
        params = dict(model.named_parameters())
        for name, module in _HF_EXPECTED[which].items():
            assert name in params, name
            assert part.owner[name] == module, (name, part.owner[name], module)
    finally:
        for name in frozen:
            model.get_parameter(name).requires_grad_(False)
    if frozen:  # as transformers builds it: the frozen backbone holds no module, the encoder anchors
        part = resolve_partition(model)
        assert "backbone" not in part.order and part.anchor == "encoder"
        assert set(part.owner) == {n for n, p in model.named_parameters() if p.requires_grad}
