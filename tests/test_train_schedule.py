"""Unit tests of the launcher's pure parts: lr schedule, batch-scaling rule, clipping window,
step-indexed sampling and its resumption, checkpoint discovery, metrics and the plot."""

from __future__ import annotations

import json
import math

import pytest

from agvm_ds.errors import ConfigError
from agvm_ds.config.train import LrScalingConfig, TrainConfig
from agvm_ds.train.checkpoint import MARKER, complete_tags, resolve_resume, tag_for
from agvm_ds.train.metrics import MetricsWriter, agvm_record, read_metrics
from agvm_ds.train.plot import modulation_series, plot_modulation
from agvm_ds.train.sampler import StepSampler, mix_seed
from agvm_ds.train.schedule import (build_lr_schedule, clip_norm_at, resolve_steps,
                                    scaled_lr)


def test_paper_lr_rule():
    rule = LrScalingConfig(base_lr=0.02, base_batch=16, sqrt_above=128)
    assert scaled_lr(rule, 16) == pytest.approx(0.02)
    assert scaled_lr(rule, 128) == pytest.approx(0.16)  # linear up to 128
    assert scaled_lr(rule, 512) == pytest.approx(0.16 * math.sqrt(4))  # sqrt above
    assert scaled_lr(rule, 1536) == pytest.approx(0.16 * math.sqrt(12))
    linear = LrScalingConfig(base_lr=0.01, base_batch=8)
    assert scaled_lr(linear, 1024) == pytest.approx(1.28)


def test_warmup_and_decay_shapes():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, warmup_ratio=0.01, decay="step",
                      milestones=[0.5, 0.9], gamma=0.1)
    s = build_lr_schedule(cfg, 100, 10)
    assert s.factor(0) == pytest.approx(0.01)
    assert s.factor(5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert s.factor(10) == 1.0 and s.factor(49) == 1.0
    assert s.factor(50) == pytest.approx(0.1) and s.factor(90) == pytest.approx(0.01)
    exp = build_lr_schedule(cfg.model_copy(update={"warmup": "exponential"}), 100, 10)
    assert exp.factor(0) == pytest.approx(0.01) and exp.factor(5) == pytest.approx(0.1)
    cos = build_lr_schedule(cfg.model_copy(update={"decay": "cosine", "min_lr_ratio": 0.1}),
                            100, 10)
    assert cos.factor(10) == pytest.approx(1.0)
    assert cos.factor(55) == pytest.approx(0.55)
    assert cos.factor(100) == pytest.approx(0.1)
    groups = [{"lr": 9.0, "base_lr": 2.0}, {"lr": 1.0}]
    s.apply(groups, 50)
    assert groups[0]["lr"] == pytest.approx(0.2) and groups[1]["lr"] == pytest.approx(0.1)


def test_epochs_to_steps_and_clip_window():
    cfg = TrainConfig(epochs=2, warmup_epochs=0.5)
    assert resolve_steps(cfg, dataset_len=1000, global_batch=64) == (32, 8)
    cfg = TrainConfig(max_steps=10, grad_clip={"max_norm": 1.0, "start_step": 2, "end_step": 5})
    assert [clip_norm_at(cfg, s) for s in range(6)] == [0, 0, 1.0, 1.0, 1.0, 0]
    assert clip_norm_at(TrainConfig(max_steps=3), 1) is None


@pytest.mark.parametrize("bad", [{}, {"max_steps": 1, "epochs": 1}, {"max_steps": 0},
                                 {"max_steps": 5, "milestones": [0.9, 0.5]},
                                 {"max_steps": 5, "grad_clip": {"max_norm": 1, "start_step": 4,
                                                                "end_step": 2}},
                                 {"max_steps": 5, "warmup": "cubic"}])
def test_train_section_rejects(bad):
    from agvm_ds.config.base import parse_section

    with pytest.raises(ConfigError, match="train"):
        parse_section(TrainConfig, bad, "train")


def test_sampler_covers_epoch_and_resumes_exactly():
    world, micro, gas = 2, 3, 2
    samplers = [StepSampler(50, world, r, micro, gas, seed=7) for r in range(world)]
    assert samplers[0].steps_per_epoch == 50 // 12
    seen = []
    for step in range(samplers[0].steps_per_epoch):
        for s in samplers:
            batches = s.micro_batches(step)
            assert len(batches) == gas and all(len(b) == micro for b in batches)
            seen += [i for b in batches for i, _ in b]
    assert len(seen) == len(set(seen))  # one epoch: no index twice
    full = list(samplers[1].iter_micro_batches(0, 11))
    tail = list(samplers[1].iter_micro_batches(5, 11))
    assert full[5 * gas:] == tail  # resuming at step 5 replays the same batches and seeds
    assert samplers[0].position(9) == {"epoch": 2, "start_index": 12, "seed": 7, "world_size": 2}
    assert mix_seed(1, 2) != mix_seed(2, 1) and mix_seed(1, 2) == mix_seed(1, 2)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        StepSampler(5, 2, 0, 2, 2)


def test_checkpoint_discovery(tmp_path):
    ck = tmp_path / "checkpoints"
    for step, complete in ((4, True), (8, True), (12, False)):
        d = ck / tag_for(step)
        d.mkdir(parents=True)
        if complete:
            (d / MARKER).write_text("{}")
    assert [s for s, _ in complete_tags(ck)] == [4, 8]
    assert resolve_resume("auto", ck).name == tag_for(8)  # the torn step 12 is skipped
    assert resolve_resume("auto", tmp_path / "none") is None
    assert resolve_resume(str(ck / tag_for(4)), ck).name == tag_for(4)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_resume(str(ck / tag_for(12)), ck)


def test_metrics_resume_truncates_and_plot(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path, start_step=0)
    for step in range(1, 7):
        rec = {"step": step, "loss": 1.0 / step, "lr": 0.1, "step_time_s": 0.1}
        mod = {"step": step, "modules": {"backbone": {"cos": 0.5, "phi": 0.5, "mu": 1.0},
                                         "head": {"cos": 0.9, "phi": 0.1, "mu": 1.0 + step / 10}}}
        agvm, _ = agvm_record(mod if step % 2 == 0 else None, None)
        if agvm:
            rec["agvm"] = agvm
        w.write(rec)
    w.close()
    w = MetricsWriter(path, start_step=4)  # resumed after step 4: steps 5, 6 are redone
    w.close()
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    series = modulation_series(rows)
    assert series["head"]["step"] == [2, 4] and series["head"]["mu"] == [1.2, 1.4]
    png = plot_modulation(path, tmp_path / "fig.png")
    assert png is not None and png.stat().st_size > 1000
    path.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert plot_modulation(path, tmp_path / "none.png") is None
