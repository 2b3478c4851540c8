"""Planted bugs in AGVM's statistics path, for the mutation suite (tests/test_mutations.py).

Each name below is a real bug a reviewer could write, planted by a couple of lines at the
code site it belongs to, inert unless ``AGVM_DS_MUTATION`` names it. The self-check and the
conformance slice must fail on every one — that is what shows they can see a 1 % error in
bf16 as well as in fp32. The variable is read here only, on every call (a test switches it
between cells inside one process), and costs one dictionary lookup where it is consulted.
A ground-floor module (it imports nothing of the package), so the statistics code can ask it
without an arrow to ``agvm_ds.testing``.
"""

from __future__ import annotations

import os

ENV = "AGVM_DS_MUTATION"

#: name → the bug it plants (and where)
MUTATIONS = {
    "micro_late": "micro estimator snapshots S one micro-batch late (GAS >= 3) — estimators/micro.py",
    "owner_next": "owner layout: each rank's pieces are the next rank's partition — adapters/base.py",
    "pair_x1.01": "<G1,G2> of the first module x 1.01 — controller._resolve",
    "pair_x1.05": "<G1,G2> of the first module x 1.05 — controller._resolve",
    "halves_swapped": "|G1|^2 summed from G2 (G1 <-> G2 in that one sum) — controller._update_stats",
    "rank_dropped": "the last rank's partition left out of the statistics — controller._update_stats",
    "autocast_scaler_ignored": "torch_autocast GradScaler's scale not removed — adapters/base.grad_scale",
    "fp16_scale_ignored": "DeepSpeed fp16 loss scale not removed — adapters/base.grad_scale",
    "offload_stale": "offload: the snapshot reads the host buffer DeepSpeed fills only at the boundary "
                     "(last step's gradient, as if read before this step's copy) — adapters/zero12.py",
    "skipped_counted": "a step with a non-finite gradient handed to mu's update as well as counted skipped "
                       "(the modulator refuses it and counts it again) — controller._resolve",
}


def active(name: str) -> bool:
    """Whether ``AGVM_DS_MUTATION`` plants the bug ``name`` (which must be one of :data:`MUTATIONS`)."""
    if name not in MUTATIONS:
        raise KeyError(f"unknown mutation {name!r}")
    return os.environ.get(ENV) == name
