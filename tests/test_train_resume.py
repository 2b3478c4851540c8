"""Crash one rank mid-run, then ``--resume auto``: same final parameters, μ and evaluation.

Three real 2-rank runs of ``launch/train.py`` (CPU fp32, ZeRO-2): an uninterrupted one, one
where rank 1 dies hard before step 7 (``AGVM_DS_FAULT_AT_STEP``, through the ``deepspeed``
launcher, which must exit non-zero), and its ``--resume auto`` continuation from the last
complete checkpoint (step 4). The data order, the lr schedule, the clipping window and
AGVM's state (μ, its step counter) must all carry over exactly. Run with a Semantic FPN and
with the quickstart's RetinaNet; both train BatchNorm in their backbones, whose per-rank
running statistics a resume would replace by rank 0's unless they are averaged across
ranks before every checkpoint - so both runs evaluate at the end and must score the same.

The uninterrupted run's final checkpoint, evaluated in this single process, must also give
exactly the 2-rank evaluation of that run (each rank scored its shard with its own copy of
the BatchNorm statistics, averaged before the evaluation).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from agvm_ds.checkpoint_engine import safe_load
from agvm_ds.train.checkpoint import complete_tags, tag_for
from train_helpers import TINY, metrics, mu_series, run_train, tail, write_config

pytestmark = pytest.mark.slow


def _module_state(out, step):
    path = out / "checkpoints" / tag_for(step) / "mp_rank_00_model_states.pt"
    return safe_load(path)["module"]


SEMANTIC = {"model": {"spec": "models/semantic_fpn_uninet_tiny.json", "num_classes": 7},
            "task": "semantic"}


MODELS = ["semantic_fpn", "retinanet"]
METRIC = {"semantic_fpn": "mIoU", "retinanet": "bbox_AP"}


@pytest.fixture(scope="module", params=MODELS)
def uninterrupted(request, tmp_path_factory):
    """(model, config path, output dir) of the uninterrupted run, shared by both tests."""
    model, tmp = request.param, tmp_path_factory.mktemp(request.param)
    cfg = copy.deepcopy(TINY)
    cfg["train"]["eval_at_end"] = True
    if model == "semantic_fpn":
        cfg["model"] = SEMANTIC["model"]
        cfg["data"]["task"] = SEMANTIC["task"]
        # at lr 0.02 the 12-step model labels every pixel background, whatever its BatchNorm
        # statistics; at 0.1 it segments, so the evaluation sees the statistics (measured)
        cfg["optimizer"]["params"]["lr"] = 0.1
    config = write_config(tmp / "tiny.json", cfg)
    proc = run_train(config, tmp / "ref")
    assert proc.returncode == 0, tail(proc)
    return model, config, tmp / "ref"


def _scores(out) -> dict:
    return {k: v for k, v in json.loads((out / "eval.json").read_text()).items()
            if k != "eval_time_s" and not isinstance(v, (dict, list))}


def test_crash_then_resume_matches_uninterrupted(uninterrupted):
    model, config, ref_out = uninterrupted
    out = ref_out.parent / "crash"

    proc = run_train(config, out, launcher="deepspeed", extra_env={"AGVM_DS_FAULT_AT_STEP": "6"})
    assert proc.returncode != 0, tail(proc)
    tags = complete_tags(out / "checkpoints")
    assert [s for s, _ in tags] == [4], tags  # the last complete checkpoint, nothing torn
    assert set(_module_state(out, 4)) == set(_module_state(ref_out, 4))
    assert len(metrics(out)) in (5, 6)  # stopped before step 7

    proc = run_train(config, out, "--resume", "auto")
    assert proc.returncode == 0, tail(proc)
    assert "resumed from" in proc.stdout and tag_for(4) in proc.stdout

    ref_rows, rows = metrics(ref_out), metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for a, b in zip(ref_rows, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-9), a["step"]
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)
    ref_mu, mu = mu_series(ref_rows), mu_series(rows)
    assert mu.keys() == ref_mu.keys()
    for key in ref_mu:
        assert mu[key] == pytest.approx(ref_mu[key], rel=1e-6), key

    a, b = _module_state(ref_out, 12), _module_state(out, 12)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-8, msg=name)
    # same BatchNorm statistics on every rank after the resume -> the same evaluation
    ref_eval, resumed_eval = _scores(ref_out), _scores(out)
    assert resumed_eval.keys() == ref_eval.keys() and METRIC[model] in ref_eval
    for key, value in ref_eval.items():
        assert resumed_eval[key] == pytest.approx(value, abs=1e-6), key


def test_two_rank_eval_equals_single_rank_eval_of_the_checkpoint(uninterrupted):
    from agvm_ds.config.run import load_run_config
    from agvm_ds.evaluation.distributed import evaluate_dataset
    from agvm_ds.models.norms import averaged_batchnorms
    from agvm_ds.train import build as B

    model_name, config, ref_out = uninterrupted
    run = load_run_config(config, world_size=2)
    _, val_set = B.build_datasets(run)
    model = B.build_model(run, getattr(val_set, "num_classes", None))
    state = _module_state(ref_out, 12)
    model.load_state_dict(state, strict=True)
    assert len(averaged_batchnorms(model)) >= 10  # a BatchNorm model, trained statistics
    assert all(int(m.num_batches_tracked) == 12 * 2 for m in averaged_batchnorms(model))
    stats = evaluate_dataset(model, val_set, batch_size=run.train.eval_batch_size or run.micro_batch)
    ref = _scores(ref_out)
    assert ref[METRIC[model_name]] > 0  # something was detected / segmented
    for key, value in ref.items():
        if key != "step":
            assert float(stats[key]) == pytest.approx(value, abs=1e-6), key
