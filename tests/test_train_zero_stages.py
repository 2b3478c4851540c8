"""The same 36-step 2-rank run under ZeRO stages 0-3 gives the same losses and the same μ.

Real runs of ``launch/train.py`` through ``torchrun`` (CPU, gloo, fp32). The run crosses
epoch boundaries, turns global-norm clipping on for its first steps and off after, and has
AGVM updates every second step, so the schedule, the clipping switch and the statistics
are all compared across stages, and so is the final (distributed) evaluation, on 32 val
images. 36 steps (not 12) so that the model has learnt something: the untrained model
scores bbox AP 0.0 and the 12-step one AP50 0.0005 (measured), so an AP check after 12
steps could not tell a working model from a broken one; after 36 steps this run scores
AP50 0.021 / AP 0.0053 in every stage (measured), and every stage must clear a bound
(AP50 > 0.01, AP > 0.002) that the untrained and the 12-step model miss.
"""

from __future__ import annotations

import json
import math

import pytest

from train_helpers import metrics, mu_series, run_train, tail, write_config

pytestmark = pytest.mark.slow
STEPS = 36
# Stages reduce gradients in different orders; the fp32 differences (~1e-6 relative over the
# first 12 steps) grow chaotically with training, to 1e-3 - 6e-3 in the loss after step 12
# (two measurements), so the tight comparison covers the first 12 steps and the later ones
# get a loose bound.
EXACT_STEPS, LATE_REL = 12, 2e-2


def _close(a: float, b: float, rel: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-7)


def test_zero_stages_agree(tmp_path):
    config = write_config(tmp_path / "tiny.json")
    runs, evals = {}, {}
    for stage in (0, 1, 2, 3):
        out = tmp_path / f"stage{stage}"
        proc = run_train(config, out, "--override", f"zero_optimization.stage={stage}",
                         "--override", "train.checkpoint_every=0",
                         "--override", "train.checkpoint_at_end=false",
                         "--override", "train.eval_at_end=true",
                         "--override", f"train.max_steps={STEPS}",
                         "--override", "data.synthetic.val=32")
        assert proc.returncode == 0, tail(proc)
        runs[stage] = metrics(out)
        evals[stage] = json.loads((out / "eval.json").read_text())
        assert [r["step"] for r in runs[stage]] == list(range(1, STEPS + 1))
        # a lower bound the untrained model (AP50 0.0) and the 12-step one (0.0005) miss
        assert evals[stage]["bbox_AP50"] > 0.01 and evals[stage]["bbox_AP"] > 0.002, (stage, evals[stage])

    ref = runs[0]
    ref_mu = mu_series(ref)
    assert len({s for s, _ in ref_mu}) >= 5, "expected AGVM updates every other step"
    assert any(abs(mu - 1.0) > 1e-4 for mu in ref_mu.values()), "μ never moved"
    for stage in (1, 2, 3):
        rows = runs[stage]
        for a, b in zip(ref, rows):
            rel = 1e-4 if a["step"] <= EXACT_STEPS else LATE_REL
            assert _close(a["loss"], b["loss"], rel), (stage, a["step"], a["loss"], b["loss"])
            assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        # distributed evaluation works in every stage (ZeRO-3 gathers inside forward)
        assert evals[stage]["bbox_AP"] == pytest.approx(evals[0]["bbox_AP"], abs=1e-3)
        mu = mu_series(rows)
        assert mu.keys() == ref_mu.keys(), stage
        for key, value in ref_mu.items():
            rel = 1e-4 if key[0] <= EXACT_STEPS else LATE_REL
            assert _close(value, mu[key], rel), (stage, key, value, mu[key])
