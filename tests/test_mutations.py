"""The mutation suite (issue 30, item 5): every bug planted by ``AGVM_DS_MUTATION``
(agvm_ds/mutations.py) makes the CI conformance slice and the self-check fail, in
fp32 and in bf16 (and in autocast-fp16 / DeepSpeed fp16 where the bug is about their loss
scale); with no mutation the same runs pass.

"CI slice": cells of tests/test_conformance.py's slice (its covering array and rows) that
can see the bug, run by bench/conformance.py's ``run_cells``. "Self-check": ``agvm_ds.
selfcheck.run`` on a run file (the quickstart, or the shipped ZeRO-2 offload file) with the
bug's settings, 4 steps. The switch is set between runs inside the ranks of the one launch
tests/conformance_cases.py shares with the CI slice. The control: every self-check run file
here passes with no mutation (the slice cells' unmutated runs are tests/test_conformance.py's,
which asserts every one of them exact).
"""

from __future__ import annotations

import json

import pytest

from conformance_cases import C, PLAN  # C: bench/conformance.py

from agvm_ds.mutations import MUTATIONS


def test_every_mutation_has_a_plan():
    assert list(PLAN) == list(MUTATIONS)


def _label(entry):
    _, prec, label, what, payload = entry
    return f"{label} {prec}: " + (C.key(payload) if what == "cell" else
                                  f"run file {json.dumps({k: payload[0].get(k) for k in ('zero_optimization', 'gradient_accumulation_steps')})}"
                                  + (f" NaN at {payload[1]}" if payload[1] else ""))


@pytest.fixture(scope="module")
def outcomes(ci_conformance):
    """([(control entry, result)], [(mutated entry, result)]) from the launch shared with the CI slice."""
    return ci_conformance[1], ci_conformance[2]


def _figures(r):
    if r.get("checks"):
        return "; ".join(("ok " if ok else "FAIL ") + line for ok, _, line in r["checks"] if not ok) or "all ok"
    return r.get("message", "")


def test_control_without_mutation_passes(outcomes):
    controls, mutated = outcomes
    for e, r in controls:
        print(_label(e), r["verdict"], r["seconds"], "s")
    print(f"{len(controls)} control and {len(mutated)} mutated runs: "
          f"{sum(r['seconds'] for _, r in controls + mutated):.1f} s inside the ranks")
    bad = [(_label(e), _figures(r)) for e, r in controls if r["verdict"] != "exact"]
    assert not bad, bad


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mutation_is_caught(outcomes, mutation):
    _, mutated = outcomes
    mine = [(e, r) for e, r in mutated if e[0] == mutation]
    assert {e[2] for e, _ in mine} == {"CI slice", "self-check"}, mutation
    assert {e[1] for e, _ in mine} == set(PLAN[mutation][0]), mutation
    for e, r in mine:
        print(f"{mutation} | {_label(e)} | {'caught' if r['verdict'] == 'THIRD KIND' else 'MISSED'} | {_figures(r)}")
    missed = [_label(e) for e, r in mine if r["verdict"] != "THIRD KIND"]
    assert not missed, f"{mutation} not caught by: {missed}"
