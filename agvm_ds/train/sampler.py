"""Step-indexed batches on top of the epoch order of :class:`agvm_ds.data.sampler.ResumableDistributedSampler`.

Optimizer step ``s`` is step ``k = s % steps_per_epoch`` of epoch ``e = s // steps_per_epoch``;
its global batch is positions ``[k·B, (k+1)·B)`` (``B = micro × GAS × world``) of that
epoch's global order (one permutation per epoch, the same for every world size). The
global batch is cut into ``GAS·world`` micro-blocks of ``micro`` consecutive positions,
numbered ``j = 0 … GAS·world − 1``; rank ``r``'s micro-step ``m`` takes block
``j = m·world + r`` (:meth:`StepSampler.block`). So resuming at step ``s`` needs only
``s``, every ZeRO stage sees the same data, and with ``B`` and ``micro`` fixed the blocks
do not depend on the world size: 2 ranks × GAS 2 and 1 rank × GAS 4 train on the same
four blocks, and the first half of the micro-steps (AGVM's ``micro`` estimator) covers
the same first half of the blocks in both. Model-side randomness is seeded per block
(the training loop's ``mix_seed(seed, step, j)``), so it is world-size independent too.

Each sample is loaded with the global RNGs (python, numpy, torch) seeded from (seed,
epoch, index), so random augmentation is reproducible whatever the number of loader
workers, wherever a run was resumed and on however many ranks.

Notes:
    Epochs drop the incomplete last global batch (``steps_per_epoch = len // B``).

Limitations:
    The training set must hold at least one global batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from agvm_ds.data.sampler import ResumableDistributedSampler

_MASK = 0xFFFFFFFFFFFFFFFF


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style; stable across runs and platforms)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & _MASK
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class StepSampler:
    """Which dataset indices this rank's micro-batches hold at each optimizer step."""

    dataset_len: int
    world_size: int
    rank: int
    micro_batch: int
    grad_accum: int
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self):
        if self.dataset_len < self.global_batch:
            raise ValueError(f"the training set ({self.dataset_len} images) is smaller than one "
                             f"global batch ({self.global_batch})")

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_len // self.global_batch

    def position(self, step: int) -> dict[str, int]:
        """The sampler state at the start of ``step`` (saved in checkpoints)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "start_index": k * self.global_batch, "seed": self.seed,
                "world_size": self.world_size}

    def block(self, micro_step: int) -> int:
        """Global index of the micro-block this rank trains on at ``micro_step`` of a step."""
        return micro_step * self.world_size + self.rank

    def _order(self, epoch: int) -> list[int]:
        # the shared epoch order; one "replica" so that it never depends on the world size
        return ResumableDistributedSampler(self.dataset_len, num_replicas=1, rank=0,
                                           shuffle=self.shuffle, seed=self.seed).global_order(epoch)

    def iter_micro_batches(self, start_step: int, stop_step: int
                           ) -> Iterator[list[tuple[int, int]]]:
        """Micro-batches of steps ``start_step .. stop_step-1`` as (index, sample seed) lists."""
        epoch_cached, order = None, []
        for step in range(start_step, stop_step):
            epoch, k = divmod(step, self.steps_per_epoch)
            if epoch != epoch_cached:
                epoch_cached, order = epoch, self._order(epoch)
            base = k * self.global_batch
            for m in range(self.grad_accum):
                lo = base + self.block(m) * self.micro_batch
                yield [(int(i), mix_seed(self.seed, epoch, int(i))) for i in order[lo:lo + self.micro_batch]]

    def micro_batches(self, step: int) -> list[list[tuple[int, int]]]:
        """The ``grad_accum`` micro-batches of one step on this rank."""
        return list(self.iter_micro_batches(step, step + 1))


class StepBatchSampler:
    """A ``batch_sampler`` for ``DataLoader``: the micro-batches of steps ``start .. stop-1``."""

    def __init__(self, sampler: StepSampler, start_step: int, stop_step: int):
        self.sampler, self.start, self.stop = sampler, start_step, stop_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self.sampler.iter_micro_batches(self.start, self.stop)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.sampler.grad_accum


class SeededDataset(Dataset):
    """Wraps a dataset so ``ds[(index, seed)]`` loads ``index`` with the RNGs seeded by ``seed``."""

    def __init__(self, dataset: Sequence):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        seed_all(seed)
        return self.dataset[index]
