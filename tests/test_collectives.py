"""Collectives live in few, known places and run on the accelerator's device.

gloo accepts CPU tensors in collectives, NCCL does not, so no CPU test can catch a
``dist.all_reduce(torch.tensor(...))``. Instead the package's source is walked and every
``torch.distributed`` / ``deepspeed.comm`` collective must sit in one of the modules below;
``agvm_ds.collectives`` (which moves its tensors to the accelerator's device) is the one the
rest of the package uses.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from agvm_ds import collectives
from agvm_ds.testing.distributed import run_distributed
from agvm_ds.train.metrics import LossLog

REPO = Path(__file__).resolve().parents[1]

#: module → why it may issue collectives itself
ALLOWED = {
    "agvm_ds/collectives.py": "the helper: moves tensors to the accelerator's device",
    "agvm_ds/core/controller.py": "AGVM's statistics all-reduce and finiteness flag, on adapter.device",
    "agvm_ds/core/reducer.py": "the ranks estimator's signed stream, buffers on the accumulator's device",
}

COLLECTIVES = {
    "all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_base",
    "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_base", "gather", "scatter", "barrier",
    "monitored_barrier", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "broadcast_object_list", "all_gather_object", "gather_object",
    "scatter_object_list", "all_reduce_coalesced", "inference_all_reduce",
}
DIST_MODULES = {"torch.distributed", "deepspeed.comm"}


def collective_calls(source: str) -> list[tuple[int, str]]:
    """(line, name) of every call of a collective of torch.distributed / deepspeed.comm,
    however the module was imported (alias, ``from … import``, or spelled out)."""
    tree = ast.parse(source)
    module_aliases: set[str] = set()   # names bound to a distributed module
    function_aliases: dict[str, str] = {}  # names bound to a collective function
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES and a.asname:
                    module_aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in DIST_MODULES:
                    module_aliases.add(a.asname or a.name)
                elif node.module in DIST_MODULES and a.name in COLLECTIVES:
                    function_aliases[a.asname or a.name] = a.name

    def dotted(expr) -> str:
        parts = []
        while isinstance(expr, ast.Attribute):
            parts.append(expr.attr)
            expr = expr.value
        if isinstance(expr, ast.Name):
            parts.append(expr.id)
        return ".".join(reversed(parts))

    found = []
    # A distributed module handed on as a value (``comm=dist``, ``self.comm = dist``) lets
    # its collectives be called through another name: count the hand-over itself.
    attribute_bases = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Name) and node.id in module_aliases and isinstance(node.ctx, ast.Load)
                and id(node) not in attribute_bases):
            found.append((node.lineno, f"{node.id} passed on as a value"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in function_aliases:
            found.append((node.lineno, function_aliases[f.id]))
        elif isinstance(f, ast.Attribute) and f.attr in COLLECTIVES:
            owner = dotted(f.value)
            if owner in module_aliases or owner in DIST_MODULES:
                found.append((node.lineno, f.attr))
    return found


def test_checker_finds_every_import_style():
    src = '''
import torch
import torch.distributed as dist
import deepspeed.comm as dscomm
from torch import distributed as tdist
from torch.distributed import all_reduce as ar, barrier
from deepspeed import comm

def f(x):
    dist.all_reduce(x)
    dscomm.reduce_scatter_tensor(x, x)
    tdist.broadcast(x, 0)
    ar(x)
    barrier()
    comm.all_gather_object([], x)
    torch.distributed.reduce(x, 0)
    torch.gather(x, 0, x)          # a tensor op, not a collective
    x.all_reduce()                 # a method of something else
    dist.get_rank()                # not a collective

def g(x, backend=dist):            # the module handed on: its calls would be invisible
    backend.all_reduce(x)
'''
    names = sorted(name for _, name in collective_calls(src))
    assert names == sorted(["all_reduce", "reduce_scatter_tensor", "broadcast", "all_reduce", "barrier",
                            "all_gather_object", "reduce", "dist passed on as a value"])


def test_collectives_only_in_allowed_modules():
    offenders = []
    seen_allowed = set()
    for root in ("agvm_ds", "launch"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            calls = collective_calls(path.read_text())
            if rel in ALLOWED:
                seen_allowed.update([rel] if calls else [])
                continue
            offenders += [f"{rel}:{line}: {name}" for line, name in calls]
    assert not offenders, ("collectives outside the allowed modules (use agvm_ds.collectives, "
                           "which puts tensors on the accelerator's device):\n" + "\n".join(offenders))
    # The allow-list names modules that really issue collectives (a stale entry would hide one).
    assert seen_allowed == set(ALLOWED), f"allow-list entries without collectives: {set(ALLOWED) - seen_allowed}"


class _RecordingDist:
    """A stand-in for torch.distributed with 2 ranks that records what it is handed."""

    class ReduceOp:
        SUM = "sum"

    def __init__(self):
        self.calls = []

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def get_rank(self):
        return 0

    def all_reduce(self, t, op=None):
        self.calls.append(("all_reduce", t.device, t.is_contiguous()))
        t.mul_(2)  # the other rank holds the same values


def test_tensor_collectives_move_to_the_accelerator_device(monkeypatch):
    fake = _RecordingDist()
    monkeypatch.setattr(collectives, "dist", fake)
    monkeypatch.setattr(collectives, "device", lambda: torch.device("meta"))
    out = collectives.all_reduce_sum(torch.ones(3, 4)[:, 1])  # a CPU, non-contiguous tensor
    assert fake.calls == [("all_reduce", torch.device("meta"), True)]
    assert out.device == torch.device("meta")


def test_collectives_are_identity_without_a_process_group():
    t = torch.arange(4.0)
    assert collectives.all_reduce_mean(t) is t
    assert collectives.gather_objects({"a": 1}) == [{"a": 1}]
    assert collectives.broadcast_object("x") == "x"


def _losses_on_two_ranks(rank, world):
    log = LossLog()
    expected = []
    for step in range(3):
        parts = []
        for micro in range(2):  # values differ by rank, step and micro-batch
            parts.append({"cls": torch.tensor(1.0 + rank + 0.1 * step + 0.01 * micro, dtype=torch.float64),
                          "loss_box": torch.tensor(10.0 * (rank + 1) + step - micro, dtype=torch.float64)})
        log.add(parts)
    return log.flush()


def test_loss_log_one_collective_for_many_steps_equals_hand_mean():
    rows = run_distributed(_losses_on_two_ranks, 2)
    assert rows[0] == rows[1]
    for step, row in enumerate(rows[0]):
        cls = sum(1.0 + r + 0.1 * step + 0.01 * m for r in range(2) for m in range(2)) / 4
        box = sum(10.0 * (r + 1) + step - m for r in range(2) for m in range(2)) / 4
        assert row["loss_cls"] == pytest.approx(cls, rel=1e-12)
        assert row["loss_box"] == pytest.approx(box, rel=1e-12)
        assert row["loss"] == pytest.approx(cls + box, rel=1e-12)
    assert len(rows[0]) == 3
