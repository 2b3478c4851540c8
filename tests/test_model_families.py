"""Model families (issue 32 item 1): the registry, ``model.builder``, the torchvision adapter.

References, independent of the code under test: the package's detector classes called
directly (what ``models/build.py`` did before the registry), torchvision's own model
called on the unnormalized image with its own transform (the adapter must give the same
detections, mapped to the original image by a naive per-box loop here), and the launcher
runs' own ``eval.json`` for what evaluating the checkpoint afterwards must reproduce.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import agvm_ds  # noqa: F401  (torchvision's ops on this torch)
from agvm_ds.config.base import parse_section
from agvm_ds.config.model import ModelConfig
from agvm_ds.errors import ConfigError
from train_helpers import REPO, TINY, metrics, mu_series, run_train, tail, write_config

sys.path.insert(0, str(REPO))  # the launch/ scripts, imported as modules
TESTS = Path(__file__).resolve().parent


def _section(**kw) -> ModelConfig:
    return parse_section(ModelConfig, kw, "model")


# -- the package's own families are rows: every shipped spec builds the same network -----------

def _reference_class(architecture: str):
    from agvm_ds.models.detectors.rcnn import FasterRCNN, MaskRCNN
    from agvm_ds.models.detectors.retinanet import RetinaNet
    from agvm_ds.models.detectors.semantic_fpn import SemanticFPN

    return {"retinanet": RetinaNet, "faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN,
            "semantic_fpn": SemanticFPN}[architecture]


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shipped_sections() -> list[tuple[str, dict]]:
    out = [(p.name, {"spec": str(p), "num_classes": json.loads(p.read_text()).get("num_classes", 80)})
           for p in sorted((REPO / "models").glob("*.json"))]
    out += [(p.name, json.loads(p.read_text())["model"]) for p in sorted((REPO / "ds_configs").glob("*.json"))]
    return out


def test_every_shipped_spec_builds_the_same_network_through_its_family_row():
    from agvm_ds.families import FAMILIES
    from agvm_ds.models import build_from_section

    sections = _shipped_sections()
    assert len(sections) >= 20
    seen, built = set(), set()
    for name, raw in sections:
        raw = {k: v for k, v in raw.items() if not k.startswith("_")}
        section = _section(**raw)
        spec = section.model_spec()
        seen.add(spec.architecture)
        key = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
        if key in built:  # several run files share one network: build it once
            continue
        built.add(key)
        with torch.device("meta"):
            ours = build_from_section(section)
            ref = _reference_class(spec.architecture)(spec)
        assert _shapes(ours) == _shapes(ref), name
        assert type(ours) is type(ref) and dict(ours.agvm_modules) == dict(ref.agvm_modules), name
    assert seen == {n for n, f in FAMILIES.items() if f.from_spec} == {"retinanet", "faster_rcnn", "mask_rcnn",
                                                                       "semantic_fpn"}
    # a spec family named as the builder reads kwargs as the spec body: the same network
    body = json.loads((REPO / "models" / "retinanet_uninet_tiny.json").read_text())
    body.pop("architecture")
    as_builder = _section(builder="retinanet", num_classes=3, kwargs=body, overrides={"head.num_convs": 1})
    as_spec = _section(spec="models/retinanet_uninet_tiny.json", num_classes=3, overrides={"head.num_convs": 1})
    assert as_builder.model_spec().model_dump() == as_spec.model_spec().model_dump()


def test_the_section_names_its_network_one_way_refused_in_one_line():
    tv = "torchvision.models.detection.fcos_resnet50_fpn"
    for bad, key in [({"num_classes": 3}, "exactly one of model.spec"),
                     ({"spec": "retinanet_uninet_tiny", "builder": "retinanet", "num_classes": 3}, "not both"),
                     ({"builder": "no_such_family", "num_classes": 3}, "unknown family 'no_such_family'"),
                     ({"builder": "torchvision.models.detection.yolo", "num_classes": 3}, "not a torchvision"),
                     ({"builder": tv, "num_classes": 3, "kwargs": {"weights": "DEFAULT"}}, "model.kwargs.weights"),
                     ({"builder": tv, "num_classes": 3, "kwargs": {"min_size": 800}}, "data.min_size"),
                     ({"builder": "a b", "num_classes": 3}, "not a family name"),
                     ({"builder": "pkg.mod:fn", "num_classes": 3, "overrides": {"x": 1}}, "model.overrides"),
                     ({"spec": "retinanet_uninet_tiny", "num_classes": 3, "kwargs": {"x": 1}}, "model.kwargs")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")) as err:
            _section(**bad)
        assert "\n" not in str(err.value)


def test_a_registered_row_builds_and_a_duplicate_or_wrong_task_is_refused(tmp_path):
    from agvm_ds import families
    from agvm_ds.config.run import validate_run_dict
    from agvm_ds.models import build_from_section

    row = families.Family("tiny_user_family", "model_family_user:build", task="boxes", partition="inferred")
    families.register_family(row)
    try:
        assert families.register_family(row) is row  # the same row again is no conflict
        with pytest.raises(ValueError, match="already registered"):
            families.register_family(families.Family("tiny_user_family", "x:y", task="masks", partition="inferred"))
        model = build_from_section(_section(builder="tiny_user_family", num_classes=4))
        assert model.head.num_classes == 4 and not hasattr(model, "agvm_modules")
        raw = copy.deepcopy(TINY)
        raw["model"] = {"builder": "tiny_user_family", "num_classes": 6}
        raw["data"]["task"] = "semantic"
        with pytest.raises(ConfigError, match="predicts boxes, which does not train on data.task 'semantic'"):
            validate_run_dict(raw, tmp_path / "x.json", world_size=2)
    finally:
        families.FAMILIES.pop("tiny_user_family", None)


def test_the_config_check_never_imports_a_user_builder_the_launcher_does(tmp_path, monkeypatch):
    from agvm_ds.config.run import validate_run_dict

    trace = tmp_path / "trace"
    monkeypatch.setenv("AGVM_DS_TEST_IMPORT_TRACE", str(trace))
    sys.modules.pop("model_family_user", None)
    raw = copy.deepcopy(TINY)
    raw["model"] = {"builder": "model_family_user:build", "num_classes": 6, "kwargs": {"spec": "x"}}
    run = validate_run_dict(raw, tmp_path / "x.json", world_size=2)
    assert any("model.builder 'model_family_user:build': not checked: custom builder" in w for w in run.warnings)
    assert not trace.exists()
    validate_run_dict(raw, tmp_path / "x.json", world_size=2, import_code=True)
    assert trace.read_text() == "imported"
    raw["model"]["builder"] = "model_family_user:no_such_function"
    with pytest.raises(ConfigError, match="model.builder: cannot import model_family_user:no_such_function"):
        validate_run_dict(raw, tmp_path / "x.json", world_size=2, import_code=True)


# -- the torchvision adapter against torchvision itself ------------------------------------------

def _pipeline_batch():
    """Two photographs of different sizes through the package's own transform (the second
    flipped) and collate."""
    from agvm_ds.data.transforms import Transform, collate

    g = torch.Generator().manual_seed(3)
    items = []
    for k, (h, w) in enumerate([(80, 100), (128, 96)]):  # both resize to a short side of 64
        transform = Transform(min_size=64, max_size=1000, flip_prob=float(k))
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        boxes = torch.tensor([[5.0, 6.0, 40.0, 50.0], [20.0, 10.0, 70.0, 60.0]])
        items.append(transform(Image.fromarray(pixels), {"image_id": k, "boxes": boxes.numpy(),
                                                        "labels": torch.tensor([0, 2]).numpy()}))
    return collate(items, 32)


def _reference_detections(model, images, targets):
    """torchvision's own model on the unnormalized resized images (its transform normalizes
    with the pipeline's mean/std; a short side of 64 is already its min_size, so it does not
    resize), then mapped to the original image by a naive per-box loop."""
    from agvm_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    model.transform.image_mean, model.transform.image_std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    model.transform.min_size, model.transform.max_size = (64,), 1000
    raw = [images[i, :, :h, :w] * std + mean for i, (h, w) in enumerate(t["image_size"] for t in targets)]
    model.eval()
    with torch.no_grad():
        dets = model(raw)
    out = []
    for det, t in zip(dets, targets):
        (h, w), (h0, w0), s = t["image_size"], t["orig_size"], t["scale_factor"]
        boxes = []
        for x1, y1, x2, y2 in det["boxes"].tolist():
            x1, x2, y1, y2 = min(max(x1, 0), w), min(max(x2, 0), w), min(max(y1, 0), h), min(max(y2, 0), h)
            if t["flipped"]:
                x1, x2 = w - x2, w - x1
            boxes.append([min(x1 / s, w0), min(y1 / s, h0), min(x2 / s, w0), min(y2 / s, h0)])
        out.append({"boxes": torch.tensor(boxes).reshape(-1, 4), "scores": det["scores"], "labels": det["labels"]})
    return out, raw


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared cores: torch's default threads oversubscribe them (10x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_rcnn():
    from torchvision.models import detection

    torch.manual_seed(0)
    return detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=4,
                                                       box_score_thresh=0.0, rpn_pre_nms_top_n_test=100,
                                                       rpn_post_nms_top_n_test=30, box_detections_per_img=20)


@pytest.mark.parametrize("kind", ["fcos", "faster_rcnn"])
def test_adapter_predicts_what_torchvision_predicts_on_the_unnormalized_image(kind, tiny_rcnn):
    from agvm_ds.models.detectors.torchvision_adapter import TorchvisionDetector
    from model_family_user import build_fcos

    torch.manual_seed(0)
    tv = build_fcos(3, score_thresh=0.0) if kind == "fcos" else copy.deepcopy(tiny_rcnn)
    if kind == "fcos":
        tv.topk_candidates, tv.detections_per_img = 50, 20
    reference = copy.deepcopy(tv)
    images, targets = _pipeline_batch()
    assert [t["flipped"] for t in targets] == [False, True] and targets[0]["scale_factor"] != 1.0
    adapter = TorchvisionDetector(tv, num_classes=3)
    assert adapter.offset == (1 if kind == "faster_rcnn" else 0)  # R-CNN: label 0 is background
    ours = adapter.predict(images, targets)
    ref, raw = _reference_detections(reference, images, targets)
    for a, b in zip(ours, ref):
        assert len(b["boxes"]) > 0
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
        assert torch.equal(a["labels"], b["labels"] - adapter.offset) and int(a["labels"].min()) >= 0
    # training: the same losses as torchvision on the unnormalized images, labels shifted for
    # R-CNN (torchvision's training-time resize is skipped: it would draw a random size first)
    adapter.train()
    reference.train()
    reference.transform._skip_resize = True
    torch.manual_seed(1)
    losses = adapter(images, targets)
    torch.manual_seed(1)
    expected = reference(raw, [{"boxes": t["boxes"], "labels": t["labels"] + adapter.offset} for t in targets])
    assert losses.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(losses[key], expected[key], rtol=1e-4, atol=1e-5)


def test_adapter_partition_is_torchvisions_inferred_one_under_the_wrapper(tiny_rcnn):
    from agvm_ds.models.detectors.torchvision_adapter import TorchvisionDetector
    from agvm_ds.partition import infer_partition, resolve_partition

    tv = copy.deepcopy(tiny_rcnn)
    inferred = infer_partition(tv)
    adapter = TorchvisionDetector(tv, num_classes=3)
    assert list(adapter.agvm_modules) == list(inferred.modules) == ["backbone", "fpn", "rpn", "roi_box"]
    assert all(p == "detector." + q for m in inferred.modules
               for p, q in zip(adapter.agvm_modules[m], inferred.modules[m]))
    partition = resolve_partition(adapter)  # every trainable parameter owned once
    assert len(partition.owner) == sum(p.requires_grad for p in adapter.parameters())
    with pytest.raises(ConfigError, match=r"scores 4 classes, the dataset needs 5 \+ 1"):
        TorchvisionDetector(copy.deepcopy(tiny_rcnn), num_classes=5)
