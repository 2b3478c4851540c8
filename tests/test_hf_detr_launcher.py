"""Issue 32's acceptance (b): a Hugging Face DETR built from its config dict (``model.builder:
"hf_detr"``, ``model.kwargs``: the ``DetrConfig`` arguments, nothing downloaded) goes through the
launcher like the package's own families — 2 gloo ranks (torchrun), ZeRO-2, 4 steps with
checkpoints at steps 2 and 4 and an evaluation at the end — then ``launch/evaluate.py`` on the
checkpoint, ``launch/export.py``, ``agvm_ds.load_model`` and ``launch/predict.py``.

References independent of the code under test: the launcher's own evaluation (``eval.json``)
for what evaluating the checkpoint afterwards must reproduce, and that evaluation's
``predictions.json`` for what the exported model must predict on the same images. μ must be
reported, finite, for each of the five modules inferred from HF's module names.
"""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest

from test_hf_detr import CONFIGS
from train_helpers import REPO, TINY, metrics, mu_series, run_train, tail, write_config

sys.path.insert(0, str(REPO))  # the launch/ scripts, imported as modules

pytestmark = pytest.mark.slow
MODULES = ["backbone", "encoder", "decoder", "class_head", "box_head"]
STEPS = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_detr")
    cfg = copy.deepcopy(TINY)
    cfg["model"] = {"builder": "hf_detr", "num_classes": 6, "kwargs": CONFIGS["detr"]}
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 1e-4}}
    cfg["agvm"] = {"enabled": True, "interval": 1, "momentum": 0.9, "start_step": 1}
    cfg["data"]["synthetic"]["train"] = 16  # and 8 val images
    cfg["train"].update(max_steps=STEPS, warmup_steps=1, milestones=[0.75], checkpoint_every=2, eval_at_end=True)
    cfg["train"]["grad_clip"] = {"max_norm": 1.0, "start_step": 0, "end_step": 1}
    proc = run_train(write_config(tmp / "hf_detr.json", cfg), tmp / "run")
    assert proc.returncode == 0, tail(proc)
    return proc, tmp / "run"


def test_launcher_trains_hf_detr_with_inferred_modules_and_reports_mu(trained):
    proc, run = trained
    assert ("agvm modules inferred (Hugging Face DETR family (DETR / Deformable DETR / RT-DETR)): "
            "backbone, encoder, decoder, class_head, box_head (anchor backbone)") in proc.stdout + proc.stderr
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and "loss_ce" in r and "loss_giou_0" in r for r in rows)
    mu = mu_series(rows)
    updates = sorted({s for s, _ in mu})
    assert len(updates) >= 2, rows
    for step in updates:
        assert sorted(m for s, m in mu if s == step) == sorted(MODULES)
        assert all(math.isfinite(mu[step, m]) for m in MODULES)
    assert mu[updates[-1], "backbone"] == 1.0  # the anchor
    assert any(mu[updates[-1], m] != 1.0 for m in MODULES[1:])  # the others were modulated
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        ["step_0000002", "step_0000004"]
    assert json.loads((run / "eval.json").read_text())["step"] == STEPS


def test_evaluate_export_load_model_predict_agree_with_training(trained, tmp_path, capsys):
    import agvm_ds
    from agvm_ds.config.data import DataConfig
    from agvm_ds.data import build_dataset
    from agvm_ds.evaluation.results import to_coco_results
    from launch import evaluate, export, predict

    _, run = trained
    ckpt = run / "checkpoints" / f"step_{STEPS:07d}"
    assert evaluate.main(["--model", str(ckpt), "--output_dir", str(tmp_path / "eval")]) == 0
    ours, ref = (json.loads(p.read_text()) for p in (tmp_path / "eval" / "eval.json", run / "eval.json"))
    scalars = [k for k, v in ref.items() if isinstance(v, float) and k != "eval_time_s"]
    assert "bbox_AP" in scalars
    for key in scalars:
        assert abs(ours[key] - ref[key]) <= 1e-3, (key, ours[key], ref[key])

    assert export.main(["--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "export")]) == 0
    record = json.loads((tmp_path / "export" / "config.json").read_text())["model_builder"]
    assert record == {"builder": "hf_detr", "kwargs": CONFIGS["detr"], "num_classes": 6}
    model = agvm_ds.load_model(tmp_path / "export")  # a registered family: no trust_code needed
    assert not model.training and model.config.num_labels == 6
    val = build_dataset(DataConfig.model_validate(model.info["run"]["data"]), "val", train=False)
    ids = list(val.ids)[:2]
    paths = [val.image_root / val.coco.imgs[i]["file_name"] for i in ids]
    mine = to_coco_results(model.predict(paths), ids, model.info["category_ids"])
    scored = [r for r in json.loads((tmp_path / "eval" / "predictions.json").read_text()) if r["image_id"] in ids]
    assert len(mine) == len(scored) > 0
    key = lambda r: (r["image_id"], -r["score"], r["category_id"], r["bbox"])  # noqa: E731
    for a, b in zip(sorted(mine, key=key), sorted(scored, key=key)):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)

    capsys.readouterr()
    assert predict.main(["--model", str(tmp_path / "export"), "--images", *map(str, paths),
                         "--output_dir", str(tmp_path / "pred"), "--score_threshold", "0"]) == 0
    records = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert sorted(records) == sorted(p.name for p in paths)
    assert sum(len(rs) for rs in records.values()) == len(mine)
    assert all(r["category_name"] in model.class_names for rs in records.values() for r in rs)
