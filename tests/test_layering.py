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
    "layouts": ("partition", "partition_rule", "partition_infer", "models", "core", "train", "data", "evaluation",
                "api", "optim", "config"),
    # the prefix rule under both resolution (partition) and inference (partition_infer)
    "partition_rule": ("partition", "partition_infer", "layouts", "models", "core", "train", "data", "evaluation",
                       "api", "optim", "config"),
    "partition_infer": ("partition", "models", "core", "train", "data", "evaluation", "api", "optim", "config"),
    "core": ("train", "models", "data", "evaluation", "api"),
    "models": ("train", "core", "data", "evaluation", "api"),
    # opening/closing the process group: every entry point's, so below all of them
    "process_group": ("core", "optim", "train", "models", "data", "evaluation", "api", "partition", "inference",
                      "selfcheck", "report"),
    # optim/: base optimizers and their exact layer-wise norms; refusals use agvm_ds.errors
    "optim": ("config", "core", "train", "models", "data", "evaluation", "api", "partition"),
    # the ground floor: DeepSpeed's flat partitions and the user-error type
    "zero_layout": ("config", "core", "optim", "train", "models", "data", "evaluation", "api", "partition"),
    # the model-family registry: pure rows and a lookup, imported by config/ and models/ alike
    "families": ("config", "core", "optim", "train", "models", "data", "evaluation", "api", "partition",
                 "inference", "zero"),
    "errors": ("config", "core", "optim", "train", "models", "data", "evaluation", "api", "partition"),
    # DeepSpeed's settings, read once (issue 30): the one reader, the allow-list, the support table
    "zero": ("config", "core", "optim", "train", "models", "data", "evaluation", "api", "partition", "inference",
             "report", "selfcheck", "bruteforce"),
    # after training (issue 25): reads checkpoints and runs networks, never the training job
    "inference": ("train", "core", "api"),
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


def _is_type_checking_block(node) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _module_graph(root: Path) -> dict[str, set[str]]:
    """Module → the agvm_ds modules it imports (at any depth of the file), by dotted name;
    ``from agvm_ds.x import y`` counts as importing ``agvm_ds.x.y`` when that is a module."""
    names = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph = {}
    for name, path in names.items():
        deps = set()
        tree = ast.parse(path.read_text())
        type_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block)
                     for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in type_only:  # annotations only: never executed, not an arrow
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                           for a in node.names]
            deps |= {t for t in targets if t in names and t != name}
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between rooms (agvm_ds/<room>), package __init__ re-exports left out."""
    room = lambda m: m.split(".")[1] if m.count(".") >= 1 else m  # noqa: E731
    out: dict[str, set[str]] = {}
    for m, deps in graph.items():
        if m == "agvm_ds":
            continue
        out.setdefault(room(m), set()).update(room(d) for d in deps if d != "agvm_ds" and room(d) != room(m))
    for deps in list(out.values()):
        for d in deps:
            out.setdefault(d, set())
    return out


def test_no_import_circle_between_modules_or_rooms():
    """Imports inside functions count: a lazy import is still an arrow in the house."""
    graph = _module_graph(PACKAGE)
    assert _cycles(graph) == []
    assert _cycles(_room_graph(graph)) == []


def test_the_cycle_check_sees_a_circle(tmp_path):
    fake = tmp_path / "agvm_ds"
    for room in ("core", "optim"):
        (fake / room).mkdir(parents=True)
        (fake / room / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "core" / "adapters.py").write_text("def f():\n    from agvm_ds.optim.layerwise import SegmentMap\n")
    (fake / "optim" / "layerwise.py").write_text("from agvm_ds.core import adapters\n")
    (fake / "optim" / "typed.py").write_text(  # a type-only import is no arrow
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from agvm_ds.core.adapters import Piece\n")
    (fake / "core" / "uses_typed.py").write_text("from agvm_ds.optim import typed\n")
    graph = _module_graph(fake)
    assert _cycles(graph) == [["agvm_ds.core.adapters", "agvm_ds.optim.layerwise"]]
    assert _cycles(_room_graph(graph)) == [["core", "optim"]]


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


def test_the_estimator_name_is_compared_only_where_the_estimator_is_chosen():
    # zero.settings.choose_estimator: the config check, the launcher and initialize all ask it
    names = {"micro", "ranks"}  # ("auto" is also the name of other settings)
    found = {str(p.relative_to(REPO)): _string_comparisons(p, names) for p in PACKAGE.rglob("*.py")}
    found = {k: v for k, v in found.items() if v}
    assert list(found) == ["agvm_ds/zero/settings.py"], found


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


#: the keys that say where gradients live and in which dtype: read only in agvm_ds/zero/
DEEPSPEED_SETTING_KEYS = {"zero_optimization", "bf16", "bfloat16", "fp16", "torch_autocast", "data_types",
                          "grad_accum_dtype", "communication_data_type", "offload_optimizer", "offload_param",
                          "stage"}


def _setting_reads(path: Path) -> list[str]:
    """``x["key"]`` / ``x.get("key")`` lookups of :data:`DEEPSPEED_SETTING_KEYS` in one file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key = node.slice.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and isinstance(node.args[0], ast.Constant)):
            key = node.args[0].value
        if key in DEEPSPEED_SETTING_KEYS:
            out.append(f"{path.relative_to(REPO)}:{node.lineno}: reads {key!r}")
    return out


def test_the_zero_stage_and_precision_are_read_from_deepspeed_sections_in_one_room():
    # issue 30: one reader of DeepSpeed's settings (agvm_ds/zero/settings.py); anywhere else a
    # second reading could disagree with DeepSpeed's own (aliases, dtype spellings, defaults)
    found = [hit for p in sorted(PACKAGE.rglob("*.py")) if _room(p, PACKAGE) != "zero" for hit in _setting_reads(p)]
    assert found == []
    planted = REPO / "tests" / "_planted_reader.py"
    try:  # the check must see a reader planted outside the room
        planted.write_text('def stage(ds):\n    return ds["zero_optimization"].get("stage", 0)\n')
        assert len(_setting_reads(planted)) == 2
    finally:
        planted.unlink()


def test_config_error_is_imported_from_its_one_place():
    # issue 30: ConfigError lives in agvm_ds.errors; importing it through another module (the
    # config room used to re-export it) is a second source of the same name
    bad = []
    for root in (PACKAGE, REPO / "launch", REPO / "bench", REPO / "tests", REPO / "examples"):
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.ImportFrom) and node.module and node.module != "agvm_ds.errors"
                        and node.module.startswith("agvm_ds") and any(a.name == "ConfigError" for a in node.names)):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import ConfigError")
    assert bad == []


def test_importing_the_package_does_not_import_deepspeed():
    # DeepSpeed's import costs seconds and prints its accelerator warning before the launcher's
    # console filter can hold it; config, data, model and inference work needs none of it
    import subprocess
    import sys

    code = "import sys, agvm_ds; print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout[-500:], out.stderr[-1000:])
