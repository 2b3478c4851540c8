"""The pretrained study (issue 33, ``launch/study.py --grid pretrained``) without training:
its cells' run files (linear lr, warmup in epochs, an evaluation per epoch, the pretrained
path, the held-out draw, the seeds), the one-line refusals, the dry run's budget, the
held-out selection, and the report built from fake cell records with hand-computed values."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch import study  # noqa: E402
from launch import study_pretrained as sp  # noqa: E402

SELECTION = {f"{d}/{o}": {"interval": 2, "momentum": 0.9} for d in sp.DETECTORS for o in ("sgd", "adamw")}


def _base() -> dict:
    from agvm_ds.config.inherit import read_run_file

    return read_run_file(study.BASE_CONFIG)


def test_grid_cells_and_seeds():
    cells = sp.grid()
    assert {c.batch for c in cells} == {4, 32, 128}
    assert {(c.detector, c.optimizer) for c in cells} == {("retina", "sgd"), ("retina", "adamw")}
    for det, opt in {(c.detector, c.optimizer) for c in cells}:
        for agvm in (False, True):
            seeds = [c.seed for c in cells if (c.detector, c.optimizer, c.agvm, c.batch) == (det, opt, agvm, 128)]
            assert sorted(seeds) == list(range(5))  # >= 5 seeds at the largest batch
        assert len([c for c in cells if (c.detector, c.optimizer, c.agvm, c.batch) == (det, opt, False, 4)]) >= 3
    assert len({c.name for c in cells + sp.selection_cells()}) == len(cells) + len(sp.selection_cells())
    full = sp.grid(full=True)
    assert {c.batch for c in full} == {16, 128, 512, 1024}  # the paper's 1x (16) up to 64x
    assert {(c.detector, c.optimizer) for c in full} == {(d, o) for d in ("retina", "frcnn") for o in ("sgd", "adamw")}


def test_full_grid_configs_validate(tmp_path):
    """--full (for a GPU) is never trained here: every kind of its run files must pass the
    launcher's validation, with x64 at lr 64 x base (linear)."""
    from agvm_ds.config.run import load_run_config
    from agvm_ds.train.schedule import scaled_lr

    cells = sp.grid(full=True) + sp.selection_cells(full=True)
    for cell in {(c.detector, c.optimizer, c.agvm, c.batch, c.heldout): c for c in cells}.values():
        path = tmp_path / f"{cell.name}.json"
        path.write_text(json.dumps(sp.cell_config(cell, _base(), [], tmp_path / "bb", "bn", SELECTION, full=True)))
        run = load_run_config(path, world_size=1)
        per_16 = study.OPTIMIZERS[cell.optimizer][1]  # the default grid's lr per 16 images
        assert scaled_lr(run.train.lr_scaling, cell.batch) == pytest.approx(per_16 * cell.multiplier, rel=1e-12)


@pytest.mark.parametrize("name", ["retina-sgd-plain-b4-s0", "retina-adamw-agvm-b32-s1", "retina-sgd-agvm-b128-s4"])
def test_cell_config_linear_lr_warmup_epochs_pretrained(name, tmp_path):
    from agvm_ds.config.run import load_run_config
    from agvm_ds.train.schedule import scaled_lr

    cell = {c.name: c for c in sp.grid()}[name]
    backbone = tmp_path / "bb.safetensors"
    cfg = sp.cell_config(cell, _base(), [], backbone, "frozen_bn", SELECTION)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    run = load_run_config(path, world_size=1)  # the launcher's own validation accepts it
    b = cell.batch
    base_lr = study.OPTIMIZERS[cell.optimizer][1]
    assert scaled_lr(run.train.lr_scaling, b) == pytest.approx(base_lr * b / 16, rel=1e-12)  # linear, no sqrt
    images = cfg["data"]["synthetic"]["train"]
    assert images % 128 == 0 and cfg["data"]["synthetic"]["seed"] == 0
    micro, gas = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    assert micro * gas == b and gas >= 2 and micro <= study.LARGE_MICRO  # two halves for AGVM's estimator
    steps, warmup = study.schedule_steps(cfg, b)
    assert steps == sp.EPOCHS * images // b and warmup == sp.WARMUP_EPOCHS * images // b
    assert run.train.eval_every == images // b  # one evaluation per epoch
    assert cfg["model"]["backbone_checkpoint"] == str(backbone)
    default = sp.cell_config(cell, _base(), [], sp.DEFAULT_BACKBONE, "frozen_bn", SELECTION)
    assert default["model"]["backbone_checkpoint"] == "models/pretrained/uninet_tiny_shapes.safetensors"
    assert cfg["model"]["overrides"]["backbone.norm"] == "frozen_bn"
    assert cfg["model"]["spec"] == sp.DETECTORS[cell.detector][0]
    if cell.agvm:
        assert (run.agvm.interval, run.agvm.momentum) == (2, 0.9) and tuple(run.agvm.clamp) == (0.5, 10.0)
    else:
        assert tuple(run.agvm.clamp) == (1.0, 1.0) and run.agvm.interval == sp.PLAIN_INTERVAL


def test_selection_cells_use_the_heldout_draw_and_write_the_choice(tmp_path):
    cells = sp.selection_cells()
    assert {c.batch for c in cells} == {128} and all(c.agvm for c in cells)
    cfg = sp.cell_config(cells[0], _base(), [], tmp_path / "bb", "bn", None)
    assert cfg["data"]["synthetic"]["seed"] == sp.HELDOUT_DATA_SEED == 1
    assert (cfg["agvm"]["interval"], cfg["agvm"]["momentum"]) == (cells[0].interval, cells[0].momentum)
    # the grid's AGVM cells need the selection
    with pytest.raises(SystemExit, match="--select"):
        sp.cell_config(sp.grid()[-1], _base(), [], tmp_path / "bb", "bn", None)
    aps = {c: 0.1 * i for i, c in enumerate(cells)}  # the last candidate of each pair is best
    doc = sp.write_selection(tmp_path, aps)
    for det, opt in {(c.detector, c.optimizer) for c in cells}:
        best = max((c for c in cells if (c.detector, c.optimizer) == (det, opt)), key=aps.get)
        assert doc["chosen"][f"{det}/{opt}"] == {"interval": best.interval, "momentum": best.momentum}
    assert sp.read_selection(tmp_path) == doc["chosen"]


def test_missing_weights_refused_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere.safetensors"
    rc = study.main(["--grid", "pretrained", "--out", str(tmp_path / "o"), "--backbone_checkpoint", str(missing)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert str(missing) in err[0] and "bench/pretrain_backbone.py" in err[0] and err[0].startswith("error:")
    # weights present but no held-out selection: refused too, naming --select
    missing.write_bytes(b"x")
    assert study.main(["--grid", "pretrained", "--out", str(tmp_path / "o"), "--backbone_checkpoint", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--select" in err[0] and "selection.json" in err[0]


def test_dry_run_budget_within_three_hours(tmp_path, capsys):
    assert study.main(["--grid", "pretrained", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    total = float(out.split("total estimate ")[1].split(" h")[0])
    print(f"\ndry-run total estimate: {total} h")
    assert 0.5 < total <= 3.0
    # the estimate against a sum by hand: two slots take at least half of all cells' seconds
    base, cells = _base(), sp.selection_cells() + sp.grid()
    seconds = sum(sp.cell_seconds(c, sp.cell_config(c, base, [], tmp_path, "frozen_bn", SELECTION)) for c in cells)
    assert seconds / 2 / 3600 <= total + 0.01 <= seconds / 3600
    assert "does not exist; make it with" in out or "backbone weights: /" in out


def _fake_cell(out: Path, cell, curve: list[float], phi_head: float) -> None:
    """A finished cell: AP after each of len(curve) epochs; Φ logged every step."""
    d = out / cell.name
    (d / "run").mkdir(parents=True)
    images = 1536
    spe = images // cell.batch
    cfg = {"data": {"synthetic": {"train": images}}}
    (d / "run_config.json").write_text(json.dumps(cfg))
    (d / "study_cell.json").write_text(json.dumps({"cell": cell.name, "batch": cell.batch, "seed": cell.seed,
                                                   "rc": 0, "steps": spe * len(curve), "wall_s": 1.0}))
    (d / "run" / "eval_history.jsonl").write_text("".join(
        json.dumps({"step": spe * (e + 1), "bbox_AP": ap}) + "\n" for e, ap in enumerate(curve)))
    rows = [{"step": s, "loss": 1.0, "agvm": {"backbone": {"phi": 0.5, "mu": 1.0},
                                              "head": {"phi": phi_head, "mu": 1.0}}}
            for s in range(1, spe * len(curve) + 1, max(1, spe // 2))]
    (d / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_from_fake_cells(tmp_path, capsys):
    from launch import study_stats as st
    from launch.study_pretrained_report import write_report

    C = sp.PretrainedCell
    out, doc = tmp_path / "cells", tmp_path / "docs" / "large_batch_pretrained.md"
    cells = []
    # 1x plain: final AP 0.50, 0.52, 0.54 -> target 0.99 x 0.52 = 0.5148
    for s, final in enumerate((0.50, 0.52, 0.54)):
        cells.append(C("retina", "sgd", False, 1, s))
        _fake_cell(out, cells[-1], [0.3, 0.45, final], 0.5)
    # 32x: plain never reaches the target (censored); AGVM reaches it at epoch 3 on two seeds of three
    plain32, agvm32 = (0.30, 0.32, 0.34), (0.46, 0.52, 0.53)
    for s in range(3):
        cells.append(C("retina", "sgd", False, 32, s))
        _fake_cell(out, cells[-1], [0.1, 0.2, plain32[s]], 0.05)
        cells.append(C("retina", "sgd", True, 32, s))
        _fake_cell(out, cells[-1], [0.2, 0.4, agvm32[s]], 0.3)
    # Faster R-CNN/SGD: plain at 32x is as good as at 1x -> "no gap"
    for s, (ap1, ap32, apg) in enumerate(((0.40, 0.41, 0.40), (0.41, 0.40, 0.42), (0.42, 0.42, 0.41))):
        for agvm, batch_x, final in ((False, 1, ap1), (False, 32, ap32), (True, 32, apg)):
            cells.append(C("frcnn", "sgd", agvm, batch_x, s))
            _fake_cell(out, cells[-1], [0.2, 0.3, final], 0.5)
    write_report(out, doc, cells, command="python launch/study.py --grid pretrained",
                 selection_path=tmp_path / "none.json")
    text = doc.read_text()
    verdict = capsys.readouterr().out
    assert "Targets" in text and "retina/sgd 0.515" in text
    rows = [line for line in text.splitlines() if line.startswith("| retina | sgd | 128 |")]
    plain_row, agvm_row = rows
    assert "| no | 3 | s0 0.300, s1 0.320, s2 0.340 | 0.320 |" in plain_row  # olympic of 3 = the middle
    assert ">3, >3, >3" in plain_row                                       # censored at epoch 3
    assert "| >3, 3, 3 | 3.0 |" in agvm_row   # olympic drops the censored one; epochs to 0.1
    p_ett = st.permutation_greater([math.inf, 3.0, 3.0], [math.inf] * 3, statistic=st.prob_smaller)
    assert p_ett == pytest.approx(4 / 20)  # splits whose AGVM group holds both 3s: C(4, 1) of C(6, 3)
    assert f"| {p_ett:.3f} |" in agvm_row
    closed = ((0.46 + 0.52 + 0.53) / 3 - 0.32) / (0.52 - 0.32)
    assert f"{100 * closed:.0f} % (" in agvm_row and f"AGVM closes {100 * closed:.0f} %" in verdict
    assert "retina/sgd at ×32 (batch 128): plain loses 0.200 AP" in text
    assert "frcnn/sgd at ×32 (batch 128): no gap — plain loses 0.000 AP" in verdict
    assert (doc.parent / "images" / "large_batch_pretrained_phi.png").stat().st_size > 0
    # a second build keeps the hand-written text outside the block and holds one block
    doc.write_text("# mine\n\nreading kept\n\n" + text)
    write_report(out, doc, cells, command="again")
    assert "reading kept" in doc.read_text() and doc.read_text().count("study:begin") == 1


def test_no_target_when_the_reference_runs_learned_nothing(tmp_path, capsys):
    """A x1 plain AP of 0 would make the target 0, "reached" by every run's first evaluation:
    the report gives no target and no run counts as reaching it."""
    from launch.study_pretrained_report import write_report

    C = sp.PretrainedCell
    out, doc = tmp_path / "cells", tmp_path / "docs" / "large_batch_pretrained.md"
    cells = []
    for s in range(3):
        for agvm, batch_x, curve in ((False, 1, [0.0, 0.0, 0.0]), (False, 32, [0.0, 0.1, 0.2]),
                                     (True, 32, [0.1, 0.2, 0.3])):
            cells.append(C("retina", "sgd", agvm, batch_x, s))
            _fake_cell(out, cells[-1], curve, 0.5)
    write_report(out, doc, cells, command="x", selection_path=tmp_path / "none.json")
    rows = [line for line in doc.read_text().splitlines() if line.startswith("| retina | sgd | 128 |")]
    assert len(rows) == 2 and all(">3, >3, >3" in row for row in rows)  # nothing "reached" a target of 0
    assert "retina/sgd —" in doc.read_text()  # the targets line shows none


@pytest.mark.parametrize("detector", ["retina", "frcnn"])
def test_cell_model_section_loads_the_weights_with_frozen_statistics(detector, tmp_path):
    """The cell's ``model`` section, as the launcher reads it, builds a backbone holding the
    checkpoint's tensors, BatchNorm statistics included, and frozen_bn keeps them in train mode."""
    import torch

    from agvm_ds.config.model import ModelConfig
    from agvm_ds.models.backbones import build_backbone

    torch.manual_seed(0)
    source = build_backbone(ModelConfig(spec=sp.DETECTORS["frcnn"][0], num_classes=6).model_spec().backbone)
    for buf in source.buffers():
        if buf.is_floating_point():
            buf.uniform_(0.5, 1.5)  # statistics no fresh BatchNorm has
    path = tmp_path / "bb.pt"
    torch.save(source.state_dict(), path)
    cell = next(c for c in sp.grid(full=True) if c.detector == detector)
    cfg = sp.cell_config(cell, _base(), [], path, "frozen_bn", SELECTION)
    backbone = build_backbone(ModelConfig(**cfg["model"]).model_spec().backbone)
    loaded = backbone.state_dict()
    floats = [k for k, v in source.state_dict().items() if v.is_floating_point()]
    assert sum("running_var" in k for k in floats if k in loaded) >= 10  # the statistics are there
    for key in floats:
        if key in loaded:
            assert torch.equal(loaded[key], source.state_dict()[key]), key
    assert any("Frozen" in type(m).__name__ for m in backbone.modules())
    backbone.train()
    x = torch.randn(2, 3, 64, 64)
    backbone(x)  # a training-mode forward must not move frozen statistics
    for key, value in source.state_dict().items():
        if "running" in key and key in backbone.state_dict():
            assert torch.equal(backbone.state_dict()[key], value), key


def test_remade_weights_change_the_fingerprint(tmp_path):
    from agvm_ds.config.run import load_run_config

    weights = tmp_path / "bb.safetensors"
    cell = sp.grid()[0]
    prints = []
    for content in (b"first", b"first", b"second"):
        weights.write_bytes(content)
        cfg = sp.configs_for([cell], _base(), [], weights, "frozen_bn", SELECTION, False)[cell]
        prints.append(study.fingerprint(cfg))
    assert prints[0] == prints[1] != prints[2]
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    load_run_config(tmp_path / "run.json", world_size=1)  # _comment is allowed in a run file


def test_select_then_grid_wiring(tmp_path, monkeypatch, capsys):
    """--select trains the held-out cells (faked here: no training), records the best tau/alpha,
    and the grid's AGVM cells then carry it; the plain cells keep PLAIN_INTERVAL."""
    weights, out = tmp_path / "bb.safetensors", tmp_path / "cells"
    weights.write_bytes(b"w")
    seen = {}

    def fake_run_cells(configs, where, jobs, port, threads, log):
        records = []
        for cell, cfg in configs.items():
            seen[cell] = cfg
            if cell.heldout:  # the faster candidate wins on the held-out draw
                run = where / cell.name / "run"
                run.mkdir(parents=True)
                ap = 0.3 if cell.interval == 2 else 0.2
                (run / "eval.json").write_text(json.dumps({"bbox_AP": ap}))
            records.append({"cell": cell.name, "rc": 0})
        return records

    monkeypatch.setattr(study, "run_cells", fake_run_cells)
    common = ["--grid", "pretrained", "--out", str(out), "--doc", str(tmp_path / "doc.md"),
              "--backbone_checkpoint", str(weights)]
    assert study.main(common + ["--select"]) == 0
    assert all(c.heldout and cfg["data"]["synthetic"]["seed"] == 1 for c, cfg in seen.items())
    chosen = json.loads((out / "selection.json").read_text())["chosen"]
    assert chosen == {k: {"interval": 2, "momentum": 0.9} for k in ("retina/sgd", "retina/adamw")}
    seen.clear()
    assert study.main(common) == 0
    assert len(seen) == len(sp.grid())
    for cell, cfg in seen.items():
        assert cfg["data"]["synthetic"]["seed"] == 0
        assert cfg["agvm"]["interval"] == (2 if cell.agvm else sp.PLAIN_INTERVAL)
        assert cfg["_comment"][0].startswith("backbone weights sha256 ")
    assert "No cells have run yet" in (tmp_path / "doc.md").read_text()


@pytest.mark.parametrize("grid_args, like", [([], "sgd-plain-b16-s0"), (["--grid", "pretrained"], "retina-sgd-plain-b4-s0")])
def test_an_unknown_cell_name_is_one_line_in_both_grids(grid_args, like, tmp_path, capsys):
    rc = study.main(grid_args + ["--out", str(tmp_path), "--cells", "sgd-plain-b16-s0x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: --cells: unknown cell(s) sgd-plain-b16-s0x; names look like {like}"]
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_the_full_grid_has_its_own_folder_and_report(tmp_path, monkeypatch):
    """--full's cells share names with the CPU grid's (b128: 32x here, 8x there): by default
    they go to runs/study_pretrained_full and docs/large_batch_pretrained_full.md, so a GPU
    run never retrains over or rewrites the CPU grid's results."""
    seen = {}
    monkeypatch.setattr("launch.study_pretrained_run.main", lambda args, argv: seen.update(out=args.out, doc=args.doc) or 0)
    for full, stem in ((False, "study_pretrained"), (True, "study_pretrained_full")):
        assert study.main(["--grid", "pretrained", "--no-run"] + (["--full"] if full else [])) == 0
        assert seen["out"] == REPO / "runs" / stem and seen["doc"] == REPO / "docs" / f"large_{stem.replace('study', 'batch')}.md"


@pytest.mark.parametrize("grid_args", [[], ["--grid", "pretrained"]])
def test_a_doc_or_out_that_would_overwrite_an_input_is_refused_in_one_line(grid_args, tmp_path, capsys):
    """--doc is rewritten in place: naming the base run file (or the weights) would corrupt an
    input. Both grids refuse it, and an --out that is a file, before anything is written."""
    run_file = tmp_path / "study_shapes64.json"
    run_file.write_text('{"x": 1}')
    weights = tmp_path / "bb.safetensors"
    weights.write_bytes(b"\x00\x01")
    for extra, needle in ((["--doc", str(run_file)], f"--doc {run_file}: the report is written into a Markdown"),
                          (["--doc", str(weights)], f"--doc {weights}:"),
                          (["--out", str(run_file), "--doc", str(tmp_path / "r.md")], f"--out {run_file}: is a file")):
        argv = grid_args + ["--out", str(tmp_path / "cells"), "--no-run"] + extra
        assert study.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert run_file.read_text() == '{"x": 1}' and weights.read_bytes() == b"\x00\x01"
    assert not (tmp_path / "cells").exists() and not (tmp_path / "r.md").exists()
