"""Model families (issue 32 item 1): the registry, ``model.builder``, and the launcher run
through to predictions (the torchvision adapter itself: ``test_torchvision_adapter.py``).

References, independent of the code under test: the package's detector classes called
directly (what ``models/build.py`` did before the registry), and the launcher runs' own
``eval.json`` for what evaluating the checkpoint afterwards must reproduce.
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
