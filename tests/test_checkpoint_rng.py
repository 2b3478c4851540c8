"""RNG state in checkpoints: plain tensors, loaded without unpickling arbitrary objects."""

import random

import numpy as np
import pytest
import torch

from agvm_ds.train.checkpoint import load_checkpoint, rng_state, set_rng_state


def _draw():
    return random.random(), float(np.random.randn()), float(torch.rand(()))


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = _draw()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draw() == expected


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


class _Engine:
    def load_checkpoint(self, *args, **kwargs):
        return "loaded", {"step": 1}


def test_a_pickled_rng_file_is_refused_and_runs_nothing(tmp_path):
    tag = tmp_path / "checkpoints" / "step_1"
    tag.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"python": _Payload(str(marker))}, tag / "rng_rank0.pt")
    with pytest.raises(RuntimeError, match="not a plain-tensor RNG state"):
        load_checkpoint(_Engine(), tag)
    assert not marker.exists()
