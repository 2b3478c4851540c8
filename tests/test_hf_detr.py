"""Hugging Face DETR / Deformable DETR / RT-DETR built from config behind the detector contract
(agvm_ds/models/foreign/hf_detr.py), each against transformers' own code as the reference:
the returned losses are the weighted terms of ``outputs.loss``, the labels HF receives are the
normalized cxcywh boxes written out naively here, predictions equal the family's image
processor ``post_process_object_detection`` mapped to original pixels by hand, and the
Hungarian solver used where scipy is missing is the optimum of a brute force.
"""

from __future__ import annotations

import itertools
import json
import socket

import numpy as np
import pytest
import torch

import agvm_ds  # noqa: F401  (before transformers: installs the torchvision fallback on CPU torch)
import transformers
from agvm_ds.errors import ConfigError
from agvm_ds.models.foreign import build_hf_detector
from agvm_ds.ops.assignment import linear_sum_assignment
from agvm_ds.partition import classify_parameters, infer_partition

_BACKBONE = {"model_type": "resnet", "depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 64, 128], "embedding_size": 16}
_SMALL = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
              encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10)
# tiny configs of each family; auxiliary losses on, so per-layer loss names are exercised.
# DETR / Deformable DETR on timm's 0.4M-parameter test_resnet: transformers 5.25 freezes *every*
# parameter of its own ResNet backbone there (its freeze rule looks for "stage.1", the names
# say "stages.1"), which would leave AGVM no backbone; RT-DETR's own ResNet stays trainable.
CONFIGS = {
    "detr": dict(use_timm_backbone=True, backbone="test_resnet", use_pretrained_backbone=False,
                 auxiliary_loss=True, **_SMALL),
    "deformable_detr": dict(use_timm_backbone=True, backbone="test_resnet", num_feature_levels=3,
                            encoder_n_points=2, decoder_n_points=2, auxiliary_loss=True, **_SMALL),
    "rt_detr": dict(backbone_config=dict(_BACKBONE, model_type="rt_detr_resnet", layer_type="basic",
                                         out_features=["stage2", "stage3", "stage4"]),
                    encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32, decoder_in_channels=[32, 32, 32],
                    num_denoising=5, **_SMALL),
}
HF_CLASSES = {"detr": "DetrForObjectDetection", "deformable_detr": "DeformableDetrForObjectDetection",
              "rt_detr": "RTDetrForObjectDetection"}
PROCESSORS = {"detr": "DetrImageProcessor", "deformable_detr": "DeformableDetrImageProcessor",
              "rt_detr": "RTDetrImageProcessor"}
# how many detections each family's post-processing keeps before its threshold (HF's defaults)
HF_TOP_K = {"detr": 100, "deformable_detr": 100, "rt_detr": _SMALL["num_queries"]}
NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _batch():
    """Two padded images: one filling the canvas (scaled ×0.5), one smaller, flipped, with a box
    near the padding; labels 0-based as our datasets emit them; a third empty image."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 64, 96, generator=g)
    images[1, :, 40:, :] = 0
    images[1, :, :, 60:] = 0
    images[2, :, 48:, :] = 0
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 30.0, 40.0], [50.0, 20.0, 90.0, 60.0]]), "labels": torch.tensor([0, 2]),
         "image_size": (64, 96), "scale_factor": 0.5, "orig_size": (128, 192), "flipped": False},
        {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([1]),
         "image_size": (40, 60), "scale_factor": 1.5, "orig_size": (27, 40), "flipped": True},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
         "image_size": (48, 96), "scale_factor": 1.0, "orig_size": (48, 96), "flipped": False},
    ]
    return images, targets


def _model(model_type, **kw):
    torch.manual_seed(0)
    model = build_hf_detector(model_type, CONFIGS[model_type], NUM_CLASSES, **kw)
    with torch.no_grad():  # break the untrained model's ties between queries
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _frame(model_type, target, images):
    """(h, w) the family's boxes are normalized by: the valid size, RT-DETR the padded size."""
    return tuple(images.shape[-2:]) if model_type == "rt_detr" else target["image_size"]


def _naive_mask(images, targets):
    mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.long)
    for i, t in enumerate(targets):
        for y in range(t["image_size"][0]):
            for x in range(t["image_size"][1]):
                mask[i, y, x] = 1
    return mask


def _naive_labels(model_type, images, targets):
    labels = []
    for t in targets:
        h, w = _frame(model_type, t, images)
        rows = [[(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]
                for x0, y0, x1, y1 in t["boxes"].tolist()]
        labels.append({"class_labels": t["labels"].clone(), "boxes": torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)})
    return labels


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_losses_are_hf_weighted_terms_of_outputs_loss(model_type, monkeypatch):
    model = _model(model_type)
    hf_class = getattr(transformers, HF_CLASSES[model_type])
    assert isinstance(model, hf_class)
    images, targets = _batch()
    sent = {}
    hf_forward = hf_class.forward

    def spy(self, **kw):
        sent.update(kw)
        return hf_forward(self, **kw)

    monkeypatch.setattr(hf_class, "forward", spy)
    torch.manual_seed(1)  # RT-DETR's denoising queries draw random noise
    losses = model(images, targets)
    monkeypatch.undo()
    # what HF was given: the naive mask and naive normalized cxcywh boxes
    assert torch.equal(sent["pixel_mask"], _naive_mask(images, targets))
    for got, ref in zip(sent["labels"], _naive_labels(model_type, images, targets)):
        assert torch.equal(got["class_labels"], ref["class_labels"])
        torch.testing.assert_close(got["boxes"], ref["boxes"], rtol=0, atol=1e-6)
    # HF's own total on the same inputs and the same random draws
    torch.manual_seed(1)
    out = hf_forward(model, pixel_values=images, pixel_mask=_naive_mask(images, targets),
                     labels=_naive_labels(model_type, images, targets))
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    assert "cardinality_error" not in losses and any(k.endswith(("_0", "_aux_0")) for k in losses)
    total = sum(losses.values())
    print(model_type, {k: round(v.item(), 4) for k, v in losses.items()}, "sum", total.item(), "HF", out.loss.item())
    torch.testing.assert_close(total, out.loss, rtol=1e-6, atol=1e-6)
    if model_type != "rt_detr":  # unweighted in HF's loss_dict: ours is HF's term times its weight
        cfg = model.config
        torch.testing.assert_close(losses["loss_bbox"], out.loss_dict["loss_bbox"] * cfg.bbox_loss_coefficient)
        torch.testing.assert_close(losses["loss_giou_0"], out.loss_dict["loss_giou_0"] * cfg.giou_loss_coefficient)
    total.backward()
    heads = [p for n, p in model.named_parameters() if "class" in n or "bbox" in n]
    assert heads and all(p.grad is not None and torch.isfinite(p.grad).all() for p in heads)


def _to_original(boxes, t):
    """Resized-image xyxy → original-image xyxy, written out: clip, un-flip, unscale, clip."""
    h, w = t["image_size"]
    oh, ow = t["orig_size"]
    out = []
    for x0, y0, x1, y1 in boxes.tolist():
        x0, x1 = min(max(x0, 0), w), min(max(x1, 0), w)
        y0, y1 = min(max(y0, 0), h), min(max(y1, 0), h)
        if t["flipped"]:
            x0, x1 = w - x1, w - x0
        s = t["scale_factor"]
        out.append([min(max(x0 / s, 0), ow), min(max(y0 / s, 0), oh), min(max(x1 / s, 0), ow), min(max(y1 / s, 0), oh)])
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_predict_equals_hf_post_process_in_original_pixels(model_type):
    images, targets = _batch()
    model = _model(model_type, max_detections=HF_TOP_K[model_type], score_thresh=0.0)
    model.eval()
    with torch.no_grad():
        out = getattr(transformers, HF_CLASSES[model_type]).forward(
            model, pixel_values=images, pixel_mask=_naive_mask(images, targets))
    processor = getattr(transformers, PROCESSORS[model_type])()
    sizes = [_frame(model_type, t, images) for t in targets]
    every = processor.post_process_object_detection(out, threshold=-1.0, target_sizes=sizes)
    # a threshold inside the scores, so that the comparison keeps some detections and drops some
    threshold = float(torch.cat([r["scores"] for r in every]).median())
    reference = processor.post_process_object_detection(out, threshold=threshold, target_sizes=sizes)
    model.train()  # predict switches to eval by itself and back
    model.score_thresh = threshold
    got = model.predict(images, targets)
    assert model.training
    kept = 0
    for g, r, t in zip(got, reference, targets):
        order = torch.argsort(r["scores"], descending=True)  # ours: best first
        assert torch.equal(g["labels"], r["labels"][order])
        torch.testing.assert_close(g["scores"], r["scores"][order], rtol=0, atol=1e-6)
        torch.testing.assert_close(g["boxes"], _to_original(r["boxes"][order], t), rtol=0, atol=1e-4)
        kept += len(g["scores"])
    total = sum(len(r["scores"]) for r in every)
    print(model_type, "kept", kept, "of", total, "above", round(threshold, 4))
    assert 0 < kept < total


def _brute_force(cost):
    n, m = cost.shape
    if n > m:
        return _brute_force(cost.T)
    return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))


def test_assignment_is_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n, m = rng.integers(1, 6, 2)
        # integer costs make ties, normal ones a unique optimum
        cost = rng.integers(0, 3, (n, m)).astype(float) if trial % 3 == 0 else rng.normal(size=(n, m))
        rows, cols = linear_sum_assignment(torch.as_tensor(cost))
        assert len(rows) == min(n, m) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        assert list(rows) == sorted(rows)
        assert abs(cost[rows, cols].sum() - _brute_force(cost)) < 1e-9, (cost, rows, cols)


@pytest.mark.parametrize("config, key", [
    (dict(CONFIGS["detr"], use_pretrained_backbone=True), "model.kwargs.use_pretrained_backbone"),
    ({"backbone_config": dict(_BACKBONE, use_pretrained_backbone=True)},
     "model.kwargs.backbone_config.use_pretrained_backbone"),
    ({"backbone": "facebook/detr-resnet-50"}, "model.kwargs.backbone"),
    ({"backbone_config": {"model_type": "timm_backbone", "backbone": "hf-hub:timm/resnet18.a1_in1k"}},
     "model.kwargs.backbone_config.backbone"),
    ({"backbone": "resnet18", "use_timm_backbone": False}, "model.kwargs.backbone"),
    (dict(CONFIGS["detr"], num_labels=5), "model.kwargs.num_labels"),
    (dict(CONFIGS["detr"], d_model="wide"), "model.kwargs"),
    ("detr.json", "model.kwargs"),
])
def test_bad_configs_are_refused_in_one_line_before_building(config, key, monkeypatch):
    monkeypatch.setattr(transformers, "DetrForObjectDetection", None)  # building would fail loudly
    with pytest.raises(ConfigError) as err:
        build_hf_detector("detr", config, NUM_CLASSES)
    message = str(err.value)
    assert message.startswith(key + ":") and "\n" not in message, message


def test_unknown_type_and_rt_detr_softmax_are_refused():
    with pytest.raises(ConfigError, match=r"^model.kwargs: unknown Hugging Face detector 'yolos'"):
        build_hf_detector("yolos", {}, NUM_CLASSES)
    with pytest.raises(ConfigError, match=r"^model.kwargs.use_focal_loss: "):
        build_hf_detector("rt_detr", dict(CONFIGS["rt_detr"], use_focal_loss=False), NUM_CLASSES)


def test_every_family_builds_with_the_network_unreachable(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network use during a build from config")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for model_type, config in CONFIGS.items():
        model = build_hf_detector(model_type, config, NUM_CLASSES)
        assert model.config.num_labels == NUM_CLASSES, model_type


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_partition_is_inferred_from_hf_module_names(model_type):
    model = build_hf_detector(model_type, CONFIGS[model_type], NUM_CLASSES)
    inferred = infer_partition(model)
    print(model_type, inferred.layout, {m: p for m, p in inferred.modules.items()})
    assert inferred.layout.startswith("Hugging Face DETR") and inferred.anchor == "backbone"
    assert list(inferred.modules) == ["backbone", "encoder", "decoder", "class_head", "box_head"]
    owner, unassigned, ambiguous, empty = classify_parameters(model, inferred.modules)
    assert not unassigned and not ambiguous and not empty  # every trainable parameter owned once
    assert set(owner) == {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {"class_head": ("class_labels_classifier", "class_embed", "enc_score_head"),
             "box_head": ("bbox_predictor", "bbox_embed", "enc_bbox_head")}
    for name, module in owner.items():  # by HF's own names, written out here
        if name.startswith("model.backbone."):
            assert module == "backbone", name
        for head, words in heads.items():
            if set(words) & set(name.split(".")):
                assert module == head, name


@pytest.mark.parametrize("kwargs, match", [
    (dict(CONFIGS["detr"], use_pretrained_backbone=True), r"^model: .*model\.kwargs: use_pretrained_backbone: "),
    ({"backbone_config": {"model_type": "timm_backbone", "backbone": "hf-hub:timm/resnet18.a1_in1k"}},
     r"^model: .*model\.kwargs: backbone_config\.backbone: 'hf-hub:timm/resnet18.a1_in1k' names a Hub repository"),
])
def test_run_file_rows_refuse_downloads_when_the_file_is_checked(tmp_path, kwargs, match):
    from train_helpers import TINY

    from agvm_ds.config.run import load_run_config

    for builder in ("hf_detr", "hf_deformable_detr", "hf_rt_detr"):
        cfg = dict(TINY, model={"builder": builder, "num_classes": 6, "kwargs": CONFIGS[builder[3:]]})
        (tmp_path / "ok.json").write_text(json.dumps(cfg))
        assert load_run_config(tmp_path / "ok.json").model.family.name == builder
        cfg["model"]["kwargs"] = kwargs
        (tmp_path / "bad.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match=match) as err:
            load_run_config(tmp_path / "bad.json")
        assert "\n" not in str(err.value)


def test_a_pickled_detector_loads_where_its_class_was_never_made(monkeypatch):
    import pickle

    from agvm_ds.models.foreign import hf_detr

    model = build_hf_detector("rt_detr", CONFIGS["rt_detr"], NUM_CLASSES)
    blob = pickle.dumps(model)
    # as in a fresh process: the contract class not made yet, so the module makes it on lookup
    monkeypatch.delitem(hf_detr._CLASSES, "rt_detr")
    monkeypatch.delitem(vars(hf_detr), "AgvmRTDetrForObjectDetection")
    loaded = pickle.loads(blob)
    assert type(loaded) is not type(model) and type(loaded).__name__ == "AgvmRTDetrForObjectDetection"
    assert isinstance(loaded, transformers.RTDetrForObjectDetection) and loaded.hf_family.frame == "padded"
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
