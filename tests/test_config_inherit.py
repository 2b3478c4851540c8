"""Run-file inheritance (issue 32 item 5): ``_base_`` chains, deep merge, ``_delete_``.

* The shipped configs: every file of ``ds_configs/`` resolves to exactly the dict it held
  before the rewrite as deltas (``tests/fixtures/ds_configs_flat/``, copied before it).
* The merge against a naive reference that works on dotted leaf paths instead of recursion,
  on random trees; the order of a list of bases; ``_delete_``.
* Refusals, one line each: cycles (naming the chain), a missing base (naming the file that
  names it), a base that is not JSON (never executed), ``_base_`` below the top level.
* Where the resolved dict goes: the checks, ``--print-resolved``, ``agvm_ds.initialize``'s
  reader, the resume comparison, and — on 2 ranks — DeepSpeed itself and the run's ``config.json``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from agvm_ds.config.inherit import merge_over, read_run_file, unmarked
from agvm_ds.errors import ConfigError
from train_helpers import REPO, TINY, run_train, tail, write_config

FLAT = REPO / "tests" / "fixtures" / "ds_configs_flat"
FLAT_FILES = sorted(p.relative_to(FLAT) for p in FLAT.rglob("*.json"))


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------ the shipped configs
@pytest.mark.parametrize("rel", FLAT_FILES, ids=str)
def test_every_shipped_config_resolves_to_its_flat_copy(rel):
    """The rewrite changed no run: each file, resolved, is its pre-rewrite dict (comments too)."""
    assert read_run_file(REPO / "ds_configs" / rel) == json.loads((FLAT / rel).read_text())


def test_the_faster_rcnn_family_is_one_full_file_and_small_deltas():
    """Not vacuous: the eight Faster R-CNN files are one base and seven deltas of a few keys."""
    def leaves(node):
        return sum(leaves(v) for k, v in node.items() if k != "_comment") if isinstance(node, dict) else 1

    family = sorted((REPO / "ds_configs").glob("faster_rcnn_r50_fpn_*.json"))
    assert len(family) == 8
    deltas = {}
    for path in family:
        raw = json.loads(path.read_text())
        if path.name == "faster_rcnn_r50_fpn_sgd_bs256.json":
            assert "_base_" not in raw
            continue
        deltas[path.name] = (raw["_base_"], leaves(raw) - 1)  # less the _base_ leaf itself
        assert leaves(read_run_file(path)) > 40
    print("deltas (base, leaves):", deltas)
    assert len(deltas) == 7 and all(n <= 8 for _, n in deltas.values())
    assert {b for b, _ in deltas.values()} == {"faster_rcnn_r50_fpn_sgd_bs256.json",
                                                "faster_rcnn_r50_fpn_adamw_bs256.json"}


# ------------------------------------------------------------------ merge semantics
def _leaf_map(tree: dict) -> dict:
    return _leaves(tree) if tree else {}


def _leaves(node, prefix=()):
    """Dotted path tuple -> leaf (an empty object is a leaf ``{}``)."""
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(_leaves(v, (*prefix, k)))
        return out
    return {prefix: node}


def _reference_merge(base: dict, child: dict) -> dict:
    """The rules on leaf paths, no recursion over two trees: a child leaf drops every base
    path at or below it; a child object drops them only if it says ``_delete_`` or the base
    holds no object there; ``_delete_`` keys themselves are no leaves."""
    out = _leaf_map(base)

    def drop(p):
        for q in [q for q in out if q[:len(p)] == p]:
            del out[q]

    def base_has_object(p):
        return any(len(q) > len(p) and q[:len(p)] == p for q in out) or out.get(p, None) == {}

    def walk(node, p):
        for k, v in node.items():
            if k == "_delete_":
                continue
            q = (*p, k)
            if isinstance(v, dict):
                if v.get("_delete_") or not base_has_object(q):
                    drop(q)
                    out[q] = {}
                walk(v, q)
            else:
                drop(q)
                out[q] = v

    walk(child, ())
    # an object that received keys is no longer an empty leaf
    return {p: v for p, v in out.items()
            if not (v == {} and any(len(q) > len(p) and q[:len(p)] == p for q in out))}


def _random_tree(rng: random.Random, depth: int, deletes: bool) -> dict:
    tree = {}
    for key in rng.sample("abcde", rng.randint(0, 4)):
        roll = rng.random()
        if depth > 0 and roll < 0.45:
            tree[key] = _random_tree(rng, depth - 1, deletes)
            if deletes and rng.random() < 0.2:
                tree[key]["_delete_"] = rng.random() < 0.7
        elif roll < 0.6:
            tree[key] = [rng.randint(0, 9) for _ in range(rng.randint(0, 3))]
        elif roll < 0.7:
            tree[key] = None
        else:
            tree[key] = rng.choice([rng.randint(0, 99), rng.random(), "s", True])
    return tree


def test_merge_matches_the_leaf_path_reference_on_random_trees():
    rng = random.Random(32)
    for _ in range(600):
        base, child = _random_tree(rng, 3, deletes=False), _random_tree(rng, 3, deletes=True)
        got = unmarked(merge_over(base, child, "child.json"))
        assert _leaf_map(got) == _reference_merge(base, child), (base, child)
        assert "_delete_" not in json.dumps(got)


def test_files_lists_of_bases_and_chains_match_the_reference(tmp_path):
    """A list of bases is merged in order (the later base wins), then the file; a chain of
    bases is resolved from the farthest up; paths are relative to the file naming them."""
    rng = random.Random(5)
    for trial in range(40):
        a, b, c, top = (_random_tree(rng, 2, deletes=i > 0) for i in range(4))
        d = tmp_path / f"t{trial}"
        _write(d / "_base_" / "a.json", a)
        _write(d / "_base_" / "b.json", {"_base_": "a.json", **b})  # a chain: b over a
        _write(d / "sub" / "c.json", c)
        _write(d / "run.json", {"_base_": ["_base_/b.json", "sub/c.json"], **top})
        want = _reference_merge(a, b)
        want = _reference_merge(_rebuild(want), c)
        want = _reference_merge(_rebuild(want), top)
        got = read_run_file(d / "run.json")
        assert _leaf_map(got) == want and "_delete_" not in json.dumps(got)
    # the order, by hand
    _write(tmp_path / "x.json", {"lr": 1, "opt": {"m": 0.9, "b": [1, 2]}})
    _write(tmp_path / "y.json", {"lr": 2, "opt": {"b": [3]}})
    _write(tmp_path / "xy.json", {"_base_": ["x.json", "y.json"]})
    _write(tmp_path / "yx.json", {"_base_": ["y.json", "x.json"], "opt": {"e": 1}})
    assert read_run_file(tmp_path / "xy.json") == {"lr": 2, "opt": {"m": 0.9, "b": [3]}}
    assert read_run_file(tmp_path / "yx.json") == {"lr": 1, "opt": {"b": [1, 2], "m": 0.9, "e": 1}}


def _rebuild(leaves: dict) -> dict:
    tree: dict = {}
    for path, value in leaves.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        if path:
            node[path[-1]] = value
    return tree


def test_delete_replaces_the_base_object_and_a_diamond_is_no_cycle(tmp_path):
    base = {"optimizer": {"type": "SGD", "params": {"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4}},
            "train": {"grad_clip": {"max_norm": 1.0}, "milestones": [0.5, 0.9]}}
    _write(tmp_path / "base.json", base)
    _write(tmp_path / "adamw.json", {"_base_": "base.json",
                                     "optimizer": {"_delete_": True, "type": "AdamW", "params": {"lr": 1e-4}},
                                     "train": {"grad_clip": None, "milestones": [0.75]}})
    assert read_run_file(tmp_path / "adamw.json") == {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},  # no momentum, no weight decay
        "train": {"grad_clip": None, "milestones": [0.75]}}     # null and lists replace
    _write(tmp_path / "keep.json", {"_base_": "base.json", "optimizer": {"_delete_": False, "params": {"lr": 1}}})
    assert read_run_file(tmp_path / "keep.json")["optimizer"] == {
        "type": "SGD", "params": {"lr": 1, "momentum": 0.9, "weight_decay": 1e-4}}
    # in a list of bases, a later base's _delete_ replaces what the earlier ones hold
    _write(tmp_path / "_base_" / "schedules" / "adamw.json", {"optimizer": {"_delete_": True, "type": "AdamW"}})
    _write(tmp_path / "listed.json", {"_base_": ["base.json", "_base_/schedules/adamw.json"]})
    assert read_run_file(tmp_path / "listed.json")["optimizer"] == {"type": "AdamW"}
    # two files with the same base, both bases of a third: read twice, no cycle
    _write(tmp_path / "left.json", {"_base_": "base.json", "l": 1})
    _write(tmp_path / "right.json", {"_base_": "base.json", "r": 1})
    _write(tmp_path / "both.json", {"_base_": ["left.json", "right.json"]})
    assert read_run_file(tmp_path / "both.json") == {**base, "l": 1, "r": 1}


# ------------------------------------------------------------------ refusals, one line each
def _refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        read_run_file(path)
    text = str(err.value)
    assert "\n" not in text
    return text


def test_cycles_are_refused_naming_the_chain(tmp_path):
    _write(tmp_path / "a.json", {"_base_": "sub/b.json"})
    _write(tmp_path / "sub" / "b.json", {"_base_": "../a.json"})
    assert _refusal(tmp_path / "a.json") == (f"{tmp_path}/a.json: _base_ cycle: {tmp_path}/a.json -> "
                                             f"{tmp_path}/sub/b.json -> {tmp_path}/a.json")
    _write(tmp_path / "self.json", {"_base_": ["a.json", "self.json"]})
    assert "_base_ cycle" in _refusal(tmp_path / "self.json")
    _write(tmp_path / "me.json", {"_base_": "me.json"})
    assert _refusal(tmp_path / "me.json") == f"{tmp_path}/me.json: _base_ cycle: {tmp_path}/me.json -> {tmp_path}/me.json"


def test_the_checker_reports_a_cycle_in_one_error_line(tmp_path, capsys):
    from agvm_ds.config.run import main

    _write(tmp_path / "a.json", {"_base_": "b.json"})
    _write(tmp_path / "b.json", {"_base_": "a.json"})
    assert main([str(tmp_path / "a.json")]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == (f"error: {tmp_path}/a.json: _base_ cycle: {tmp_path}/a.json -> "
                                         f"{tmp_path}/b.json -> {tmp_path}/a.json\n")


def test_a_missing_base_names_the_file_that_names_it(tmp_path):
    _write(tmp_path / "run.json", {"_base_": "mid.json"})
    _write(tmp_path / "mid.json", {"_base_": ["_base_/gone.json"]})
    assert _refusal(tmp_path / "run.json") == (f"{tmp_path}/mid.json: _base_ '_base_/gone.json': no such file "
                                               f"({tmp_path}/_base_/gone.json)")
    (tmp_path / "broken.json").write_text('{"a": 1,}')
    _write(tmp_path / "uses_broken.json", {"_base_": "broken.json"})
    assert _refusal(tmp_path / "uses_broken.json").startswith(f"{tmp_path}/broken.json:1:")


def test_bases_are_json_files_and_never_executed(tmp_path):
    marker = tmp_path / "executed"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _write(tmp_path / "run.json", {"_base_": "evil.py"})
    assert "a base must be a .json run file" in _refusal(tmp_path / "run.json")
    assert not marker.exists()
    for bad, says in ((3, "_base_: expected a file name"), ([], "_base_: expected a file name"),
                      (["a.json", ""], "_base_: expected a file name")):
        _write(tmp_path / "bad.json", {"_base_": bad})
        assert says in _refusal(tmp_path / "bad.json")
    _write(tmp_path / "nested.json", {"model": {"_base_": "x.json"}})
    assert _refusal(tmp_path / "nested.json").endswith("model._base_: only the top level of a run file names bases")
    _write(tmp_path / "top_delete.json", {"_delete_": True, "a": 1})
    assert "_delete_ at the top level" in _refusal(tmp_path / "top_delete.json")
    _write(tmp_path / "base.json", {"a": {"x": 1}})
    _write(tmp_path / "flag.json", {"_base_": "base.json", "a": {"_delete_": "yes"}})
    assert _refusal(tmp_path / "flag.json").endswith("a._delete_: must be true or false, got 'yes'")


# ------------------------------------------------------------------ where the resolved dict goes
def test_print_resolved_prints_the_flat_file_and_overrides_apply_after_the_bases(capsys, tmp_path):
    from agvm_ds.config.run import load_run_config, main

    delta = REPO / "ds_configs" / "faster_rcnn_r50_fpn_sgd_bs512.json"
    assert main([str(delta), "--print-resolved"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == json.loads((FLAT / delta.name).read_text())  # stdout: the JSON alone
    assert "faster_rcnn_r50_fpn_sgd_bs512.json: ok (train_batch_size 512, world size 256)" in out.err
    # an override of a key the base sets wins over the base; one naming _base_ is refused
    run = load_run_config(delta, ["optimizer.params.momentum=0.8", "train.gamma=0.5"])
    assert (run.deepspeed["optimizer"]["params"]["momentum"], run.train.gamma) == (0.8, 0.5)
    with pytest.raises(ConfigError, match="bases are named by the run file's _base_"):
        load_run_config(delta, ["_base_=faster_rcnn_r50_fpn_sgd_bs1024.json"])
    assert main([str(tmp_path / "nothere.json"), "--print-resolved"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_the_api_reader_resolves_paths_and_refuses_a_dict_with_bases(tmp_path):
    from agvm_ds.api import read_config

    delta = REPO / "ds_configs" / "selfcheck" / "zero3_offload.json"
    flat = json.loads((FLAT / "selfcheck" / "zero3_offload.json").read_text())
    assert read_config(delta) == read_config(flat)  # comments dropped from both
    with pytest.raises(ConfigError, match="_base_: a config dict has no file"):
        read_config({"_base_": "zero2_offload.json"})
    from agvm_ds.config.run import validate_run_dict

    with pytest.raises(ConfigError, match="_base_: the dict was not resolved"):
        validate_run_dict({"_base_": "base.json", **TINY}, tmp_path / "run.json")


def test_a_resume_compares_resolved_dicts_so_an_edited_base_is_caught(tmp_path):
    """The stored config.json is resolved; a delta resumed after its base changed a refused
    key is refused, an allowed change in the delta itself is allowed."""
    from agvm_ds.config.run import load_run_config
    from agvm_ds.train.resolve import record_before_data
    from agvm_ds.train.resume_policy import diff_records

    base = write_config(tmp_path / "base.json", TINY)
    stored = json.loads(json.dumps(record_before_data(load_run_config(base, world_size=2), tmp_path)))
    delta = _write(tmp_path / "delta.json", {"_base_": "base.json", "train": {"max_steps": 20}})
    assert diff_records(stored, record_before_data(load_run_config(delta, world_size=2), tmp_path)) == (
        [], [("train.max_steps", 12, 20)])
    edited = json.loads(json.dumps(TINY))
    edited["optimizer"]["params"]["momentum"] = 0.8
    write_config(base, edited)
    refused, _allowed = diff_records(stored, record_before_data(load_run_config(delta, world_size=2), tmp_path))
    assert refused == [("optimizer.params.momentum", 0.9, 0.8)]


def _deepspeed_json(log: str) -> dict:
    """The config dict DeepSpeed logged (``log_level: info``: ``print_user_config``)."""
    start = log.index("json = {") + len("json = ")
    end = log.index("\n}", start) + 2
    return json.loads(log[start:end])


def test_deepspeed_and_config_json_get_the_resolved_dict_on_two_ranks(tmp_path):
    """What DeepSpeed builds its engine from is the merged dict (the base's keys and the
    delta's, no ``_base_``), and the run's config.json is the resolved file. torchrun starts
    the ranks (half the time of the ``deepspeed`` launcher here, which only passes
    ``--deepspeed_config delta.json`` through to the same ``launch/train.py``)."""
    _write(tmp_path / "_base_" / "tiny.json", TINY)
    delta = _write(tmp_path / "delta.json", {
        "_base_": "_base_/tiny.json", "log_level": "info",
        "zero_optimization": {"reduce_bucket_size": 50000000},
        "train": {"max_steps": 2, "checkpoint_every": 0, "checkpoint_at_end": False, "grad_clip": None}})
    proc = run_train(delta, tmp_path / "out", launcher="torchrun", timeout=300)
    assert proc.returncode == 0, tail(proc)
    got = _deepspeed_json((tmp_path / "out" / "log_rank0.txt").read_text())
    assert "_base_" not in got
    expected = {k: v for k, v in TINY.items() if k not in ("_comment", "optimizer", "agvm", "model", "data", "train")}
    expected["zero_optimization"] = {"stage": 2, "reduce_bucket_size": 50000000}
    # what the launcher adds: the log level (the delta's), the global batch, the client optimizer's switches
    expected.update(log_level="info", train_batch_size=8, zero_allow_untested_optimizer=True,
                    zero_force_ds_cpu_optimizer=False)
    assert got == expected
    record = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "_base_" not in record and record["zero_optimization"] == expected["zero_optimization"]
    assert record["train"]["max_steps"] == 2 and record["train"]["grad_clip"] is None
    assert record["model"]["spec"] == TINY["model"]["spec"] and record["agvm"]["interval"] == TINY["agvm"]["interval"]
