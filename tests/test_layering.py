"""The package's floors: which rooms may import which, and a few corridor rules.

Values travel downward: a config class reads and validates but never builds a network; the
data room writes annotations without the evaluation room; the partition rule sits on the
ground floor where training, the API and the partition report all reach it. The source is
walked with :mod:`ast` (imports inside functions count too), so a new upward arrow fails
here rather than in review.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
from pathlib import Path

import pytest
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "agvm_ds"

#: room → rooms of agvm_ds it must never import (directly, at any depth of the file)
FORBIDDEN = {
    "config": ("models", "train", "core", "data", "evaluation", "api"),
    "data": ("evaluation", "models", "train", "core", "api"),
    "partition": ("models", "core", "train", "data", "evaluation", "api", "optim"),
    "layouts": ("partition", "models", "core", "train", "data", "evaluation", "api", "optim", "config"),
    "core": ("train", "models", "data", "evaluation", "api"),
    "models": ("train", "core", "data", "evaluation", "api"),
}


def _room(path: Path, root: Path) -> str:
    return path.relative_to(root).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "agvm_ds":  # from agvm_ds import models
                out += [(node.lineno, f"agvm_ds.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def _violations(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        room = _room(path, root)
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] != "agvm_ds" or len(parts) < 2:
                continue
            if parts[1] in FORBIDDEN.get(room, ()):
                bad.append(f"{path.relative_to(root.parent)}:{line}: {room}/ imports {name}")
    return bad


def test_no_room_imports_a_floor_above_it():
    assert _violations(PACKAGE) == []


def test_the_walker_sees_an_upward_import(tmp_path):
    """The check above can fail: a config module importing models/ is reported."""
    fake = tmp_path / "agvm_ds"
    (fake / "config").mkdir(parents=True)
    (fake / "config" / "bad.py").write_text("def f():\n    from agvm_ds.models.build import build_model\n")
    (fake / "data").mkdir()
    (fake / "data" / "ok.py").write_text("from agvm_ds.config.files import read_json\n")
    assert _violations(fake) == ["agvm_ds/config/bad.py:2: config/ imports agvm_ds.models.build"]
    (fake / "data" / "bad.py").write_text("from agvm_ds import evaluation\n")
    assert _violations(fake)[1] == "agvm_ds/data/bad.py:1: data/ imports agvm_ds.evaluation"


def test_docstrings_point_only_at_files_in_the_repository():
    refs = [f"{p.relative_to(REPO)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if "design.md" in line]
    assert refs == []


def _string_comparisons(path: Path, names: set[str]) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            consts = [c for c in (node.left, *node.comparators)]
            for c in consts:
                if isinstance(c, ast.Constant) and c.value in names:
                    lines.append(node.lineno)
                if isinstance(c, (ast.Tuple, ast.List, ast.Set)) and any(
                        isinstance(e, ast.Constant) and e.value in names for e in c.elts):
                    lines.append(node.lineno)
        elif isinstance(node, ast.MatchValue) and isinstance(node.value, ast.Constant) \
                and node.value.value in names:
            lines.append(node.lineno)
    return lines


def test_the_estimator_name_is_compared_only_where_estimators_are_built():
    names = {"micro", "ranks"}
    found = {str(p.relative_to(REPO)): _string_comparisons(p, names) for p in PACKAGE.rglob("*.py")}
    found = {k: v for k, v in found.items() if v}
    assert list(found) == ["agvm_ds/core/estimators/__init__.py"], found


def test_resolving_a_run_leaves_the_run_file_as_loaded(tmp_path):
    """The typed root is read once and never edited: what a job derives lives elsewhere."""
    from agvm_ds.config.run import validate_run_dict
    from agvm_ds.train.resolve import resolve_run
    from train_helpers import TINY

    raw = copy.deepcopy(TINY)
    del raw["agvm"]["start_step"]  # derived from the warmup
    raw["train"]["lr_scaling"] = {"base_lr": 0.01, "base_batch": 4}
    raw["tensorboard"] = {"enabled": True}
    run = validate_run_dict(raw, tmp_path / "tiny.json", world_size=2)
    before = (copy.deepcopy(run.deepspeed), run.agvm.model_dump(), run.train.model_dump())
    resolved = resolve_run(run, tmp_path / "out", world=2, dataset_len=64)
    assert (run.deepspeed, run.agvm.model_dump(), run.train.model_dump()) == before
    assert resolved.agvm.start_step == resolved.warmup_steps and run.agvm.start_step is None
    assert resolved.deepspeed["optimizer"]["params"]["lr"] == pytest.approx(
        0.01 * run.global_batch / 4)
    assert resolved.deepspeed["tensorboard"]["output_path"] == str(tmp_path / "out" / "monitor") + "/"
    assert "output_path" not in run.deepspeed["tensorboard"]
    with pytest.raises(ValidationError, match="frozen"):
        run.agvm.interval = 3  # the sections are frozen too
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.agvm = resolved.agvm
