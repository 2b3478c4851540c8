"""Crash one rank mid-run, then ``--resume auto``: same final parameters and μ.

Three real 2-rank runs of ``launch/train.py`` (CPU fp32, ZeRO-2): an uninterrupted one, one
where rank 1 dies hard before step 7 (``AGVM_DS_FAULT_AT_STEP``, through the ``deepspeed``
launcher, which must exit non-zero), and its ``--resume auto`` continuation from the last
complete checkpoint (step 4). The data order, the lr schedule, the clipping window and
AGVM's state (μ, its step counter) must all carry over exactly. Run with a Semantic FPN and
with the quickstart's RetinaNet.
"""

from __future__ import annotations

import copy

import pytest
import torch

from agvm_ds.train.checkpoint import complete_tags, tag_for
from train_helpers import TINY, metrics, mu_series, run_train, tail, write_config

pytestmark = pytest.mark.slow


def _module_state(out, step):
    path = out / "checkpoints" / tag_for(step) / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


SEMANTIC = {"model": {"spec": "models/semantic_fpn_uninet_tiny.json", "num_classes": 7},
            "task": "semantic"}


@pytest.mark.parametrize("model", [
    "semantic_fpn",
    "retinanet",
])
def test_crash_then_resume_matches_uninterrupted(tmp_path, model):
    cfg = copy.deepcopy(TINY)
    if model == "semantic_fpn":
        cfg["model"] = SEMANTIC["model"]
        cfg["data"]["task"] = SEMANTIC["task"]
    config = write_config(tmp_path / "tiny.json", cfg)
    ref_out, out = tmp_path / "ref", tmp_path / "crash"

    proc = run_train(config, ref_out)
    assert proc.returncode == 0, tail(proc)

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
