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
#: the acceptance runs' model sections: (a) a torchvision constructor, (c) a user's function
FCOS = {"builder": "torchvision.models.detection.fcos_resnet50_fpn", "num_classes": 6,
        "kwargs": {"topk_candidates": 50, "detections_per_img": 20, "score_thresh": 0.01}}
USER = {"builder": "model_family_user:build", "num_classes": 6, "kwargs": {"score_thresh": 0.0}}


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
    from agvm_ds.config.inherit import read_run_file  # run files may be _base_ deltas

    out = [(p.name, {"spec": str(p), "num_classes": json.loads(p.read_text()).get("num_classes", 80)})
           for p in sorted((REPO / "models").glob("*.json"))]
    out += [(p.name, read_run_file(p)["model"]) for p in sorted((REPO / "ds_configs").glob("*.json"))]
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

    row = families.Family("tiny_user_family", "model_family_user:build", task="boxes", partition="inferred",
                          check="model_family_user:check")
    families.register_family(row)
    families.register_family(families.Family("bare_user_family", "model_family_user:bare", task="boxes",
                                             partition="declared"))
    try:
        with pytest.raises(ConfigError, match="model.kwargs: depth: not an argument"):
            _section(builder="tiny_user_family", num_classes=4, kwargs={"depth": 3})
        with pytest.raises(ConfigError, match="returned a Linear without predict"):
            build_from_section(_section(builder="bare_user_family", num_classes=4))
        with pytest.raises(ConfigError, match=r"model.kwargs: model_family_user:build\(num_classes=\.\.\., \*\*kwargs\)"):
            build_from_section(_section(builder="model_family_user:build", num_classes=4, kwargs={"x": 1}))
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
        families.FAMILIES.pop("bare_user_family", None)


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


def test_a_resume_refuses_another_builder_or_other_kwargs(tmp_path):
    from agvm_ds.config.run import load_run_config
    from agvm_ds.train.resolve import record_before_data
    from agvm_ds.train.resume_policy import classify, diff_records

    def record(model: dict) -> dict:
        cfg = copy.deepcopy(TINY)
        cfg["model"] = model
        run = load_run_config(write_config(tmp_path / "run.json", cfg), world_size=2)
        return record_before_data(run, tmp_path / "out")

    stored = record(USER)
    assert diff_records(stored, record(copy.deepcopy(USER))) == ([], [])
    refused, allowed = diff_records(stored, record({**USER, "kwargs": {"score_thresh": 0.5}}))
    assert refused == [("model.kwargs.score_thresh", 0.0, 0.5)] and allowed == []
    refused, _ = diff_records(stored, record(FCOS))
    assert ("model.builder", USER["builder"], FCOS["builder"]) in refused
    assert classify("model.builder") == classify("model.kwargs.x") == "refuse"


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
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        items.append(transform(Image.fromarray(pixels), {"image_id": k, "boxes": boxes.numpy(), "masks": masks.numpy(),
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
        out.append({"boxes": torch.tensor(boxes).reshape(-1, 4), "scores": det["scores"], "labels": det["labels"],
                    "masks": det.get("masks")})
    return out, raw


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_rcnn():
    from torchvision.models import detection

    torch.manual_seed(0)
    return detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=4,
                                                       box_score_thresh=0.0, rpn_pre_nms_top_n_test=100,
                                                       rpn_post_nms_top_n_test=30, box_detections_per_img=20)


def _tiny_mask_rcnn(tiny_rcnn):
    from torchvision.models.detection import MaskRCNN

    torch.manual_seed(0)
    return MaskRCNN(copy.deepcopy(tiny_rcnn.backbone), num_classes=4, min_size=64, max_size=1000,
                    rpn_anchor_generator=copy.deepcopy(tiny_rcnn.rpn.anchor_generator),
                    box_score_thresh=0.0, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30,
                    box_detections_per_img=10)


def _naive_original_probs(prob, target) -> torch.Tensor:
    """A resized-image mask probability map -> the original image's, pixel by pixel: each
    original pixel centre takes its nearest resized pixel (un-flipped)."""
    (h, w), (h0, w0) = target["image_size"], target["orig_size"]
    rows = [min(h - 1, int((y0 + 0.5) * h / h0)) for y0 in range(h0)]
    cols = [min(w - 1, int((x0 + 0.5) * w / w0)) for x0 in range(w0)]
    if target["flipped"]:
        cols = [w - 1 - x for x in cols]
    return prob[rows][:, cols]


@pytest.mark.parametrize("kind", ["fcos", "faster_rcnn", "mask_rcnn"])
def test_adapter_predicts_what_torchvision_predicts_on_the_unnormalized_image(kind, tiny_rcnn):
    from agvm_ds.models.detectors.torchvision_adapter import TorchvisionDetector
    from model_family_user import build_fcos

    torch.manual_seed(0)
    tv = {"fcos": lambda: build_fcos(3, score_thresh=0.0), "faster_rcnn": lambda: copy.deepcopy(tiny_rcnn),
          "mask_rcnn": lambda: _tiny_mask_rcnn(tiny_rcnn)}[kind]()
    if kind == "fcos":
        tv.topk_candidates, tv.detections_per_img = 50, 20
    reference = copy.deepcopy(tv)
    images, targets = _pipeline_batch()
    assert [t["flipped"] for t in targets] == [False, True] and targets[0]["scale_factor"] != 1.0
    adapter = TorchvisionDetector(tv, num_classes=3)
    assert adapter.offset == (0 if kind == "fcos" else 1)  # R-CNN: label 0 is background
    ref, raw = _reference_detections(reference, images, targets)
    if kind == "mask_rcnn":  # random mask logits sit near 0.5: cut them at their median instead
        adapter.mask_threshold = float(ref[0]["masks"][ref[0]["masks"] > 0].median())
    ours = adapter.predict(images, targets)
    for a, b in zip(ours, ref):
        assert len(b["boxes"]) > 0
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
        assert torch.equal(a["labels"], b["labels"] - adapter.offset) and int(a["labels"].min()) >= 0
    if kind == "mask_rcnn":  # masks in original pixels: the naive per-pixel map of torchvision's
        for a, b, t in zip(ours, ref, targets):
            assert a["masks"].dtype == torch.bool and a["masks"].shape[1:] == t["orig_size"]
            for k in range(0, len(a["masks"]), 3):
                naive = _naive_original_probs(b["masks"][k, 0], t)
                # nearest and bilinear sampling differ only where the probability is close
                # to the threshold: compare the pixels clear of it (most of them)
                clear = (naive - adapter.mask_threshold).abs() > 0.05
                agree = (a["masks"][k] == (naive > adapter.mask_threshold))[clear].float().mean()
                assert float(clear.float().mean()) > 0.3 and float(agree) > 0.99, (k, float(agree))
            assert any(m.any() for m in a["masks"])
    # training: the same losses as torchvision on the unnormalized images, labels shifted for
    # R-CNN (torchvision's training-time resize is skipped: it would draw a random size first)
    adapter.train()
    reference.train()
    reference.transform._skip_resize = True
    torch.manual_seed(1)
    losses = adapter(images, targets)
    torch.manual_seed(1)
    expected = reference(raw, [{"boxes": t["boxes"], "labels": t["labels"] + adapter.offset, "masks": t["masks"]}
                               for t in targets])
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


# -- acceptance: the launcher trains, checkpoints, evaluates, exports and predicts any family --------

STEPS = 2
ACCEPTANCE = {  # model section, the AGVM modules its partition must have (inferred, not declared)
    "torchvision_fcos": (FCOS, {"backbone", "fpn", "cls_head", "reg_head"}),
    "user_function": (USER, {"backbone", "neck", "head"}),
}


@pytest.fixture(scope="module", params=list(ACCEPTANCE))
def trained(request, tmp_path_factory):
    """(name, run dir, checkpoint dir) of a 2-rank run of a few steps that evaluated at its end."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    cfg = copy.deepcopy(TINY)
    cfg.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    cfg["model"] = ACCEPTANCE[name][0]
    cfg["agvm"] = {"interval": 1, "start_step": 0, "momentum": 0.5}
    cfg["data"]["synthetic"].update(train=8, val=4)
    cfg["train"].update(max_steps=STEPS, warmup_steps=1, milestones=[0.9], checkpoint_every=0, eval_at_end=True)
    cfg["train"]["grad_clip"] = {"max_norm": 1.0, "start_step": 0, "end_step": 1}
    path = f"{TESTS}:{REPO}"  # the ranks import the user's module from tests/
    proc = run_train(write_config(tmp / f"{name}.json", cfg), tmp / "run", extra_env={"PYTHONPATH": path})
    assert proc.returncode == 0, tail(proc)
    return name, tmp / "run", tmp / "run" / "checkpoints" / f"step_{STEPS:07d}", proc


@pytest.mark.slow
def test_the_launcher_runs_every_family_to_predictions(trained, tmp_path, capsys):
    import agvm_ds
    from agvm_ds.errors import UntrustedCodeError
    from launch import evaluate, export, predict

    name, run_dir, ckpt, proc = trained
    user = name == "user_function"
    # 1. μ per inferred module on every AGVM update (interval 1 from step 0)
    rows = metrics(run_dir)
    mu = mu_series(rows)
    assert {m for _, m in mu} == ACCEPTANCE[name][1], proc.stdout[-2000:]
    assert {s for s, _ in mu} == set(range(1, STEPS + 1)) and all(v > 0 for v in mu.values())
    assert ckpt.is_dir() and (run_dir / "eval.json").is_file()
    trust = ["--trust_code"] if user else []

    # 2. one process evaluates the 2-rank checkpoint: training's own numbers
    if user:  # user code is not run without --trust_code: one line naming it
        capsys.readouterr()
        assert evaluate.main(["--model", str(ckpt), "--output_dir", str(tmp_path / "no")]) == 2
        err = capsys.readouterr().err.strip()
        assert "'model_family_user:build'" in err and "trust_code" in err and len(err.splitlines()) == 1
    assert evaluate.main(["--model", str(ckpt), "--output_dir", str(tmp_path / "eval"), *trust]) == 0
    ours = json.loads((tmp_path / "eval" / "eval.json").read_text())
    ref = json.loads((run_dir / "eval.json").read_text())
    scalars = [k for k, v in ref.items() if isinstance(v, float) and k != "eval_time_s"]
    assert "bbox_AP" in scalars
    for key in scalars:
        assert abs(ours[key] - ref[key]) <= 1e-3, (key, ours[key], ref[key])

    # 3. export records the builder; load_model rebuilds it (user code only when trusted)
    assert export.main(["--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "export"), *trust]) == 0
    record = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "model_spec" not in record
    assert record["model_builder"] == {"builder": ACCEPTANCE[name][0]["builder"], "num_classes": 6,
                                       "kwargs": ACCEPTANCE[name][0].get("kwargs", {})}
    if user:
        with pytest.raises(UntrustedCodeError, match="built by user code 'model_family_user:build'"):
            agvm_ds.load_model(tmp_path / "export")
    model = agvm_ds.load_model(tmp_path / "export", trust_code=user)
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert model.state_dict().keys() == exported.keys()
    assert all(torch.equal(model.state_dict()[k], v.float() if v.is_floating_point() else v)
               for k, v in exported.items())

    # 4. predict on a val image: what evaluation scored for it, in original-image pixels
    from agvm_ds.config.data import DataConfig
    from agvm_ds.data import build_dataset

    data = build_dataset(DataConfig.model_validate(model.info["run"]["data"]), "val", train=False)
    image_id = list(data.ids)[0]
    path = data.image_root / data.coco.imgs[image_id]["file_name"]
    pred = model.predict([path])[0]
    scored = [r for r in json.loads((tmp_path / "eval" / "predictions.json").read_text())
              if r["image_id"] == image_id]
    assert len(pred["boxes"]) == len(scored) > 0
    mine = sorted(zip(pred["scores"].tolist(), pred["boxes"].tolist()), reverse=True)
    theirs = sorted(((r["score"], r["bbox"]) for r in scored), key=lambda r: -r[0])
    for (s, (x1, y1, x2, y2)), (t, bbox) in zip(mine, theirs):
        assert s == pytest.approx(t, abs=1e-5) and [x1, y1, x2 - x1, y2 - y1] == pytest.approx(bbox, abs=1e-3)
    w, h = Image.open(path).size
    assert float(pred["boxes"][:, 2].max()) <= w and float(pred["boxes"][:, 3].max()) <= h
    if not user:  # several test sizes merge at the loaded FCOS's own NMS settings (no spec to read)
        from agvm_ds.inference.test_time import merge_settings

        fcos = next(m for m in model.modules() if type(m).__name__ == "FCOS")
        assert merge_settings(model.info.get("model_spec") or {}, model) == (fcos.nms_thresh, fcos.detections_per_img)
    if user:  # launch/predict.py too (its --trust_code); each load of the FCOS is seconds of init
        assert predict.main(["--model", str(tmp_path / "export"), "--images", str(path), "--output_dir",
                             str(tmp_path / "pred"), "--score_threshold", "0", *trust]) == 0
        records = json.loads((tmp_path / "pred" / "predictions.json").read_text())
        assert len(records[path.name]) == len(scored)
