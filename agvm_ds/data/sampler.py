"""Deterministic distributed sampling that can resume in the middle of an epoch.

Each epoch has one global order (a permutation seeded by ``seed + epoch`` when shuffling,
the identity otherwise), identical on every rank. Rank ``r`` of ``N`` takes positions
``r, r+N, r+2N, …`` of that order, so shards are disjoint and together cover the epoch.

``start_index`` is a *global* position: the number of samples (summed over all ranks)
already consumed in the epoch being resumed, e.g. ``steps_done * global_batch`` within the
epoch. The sampler then yields exactly the remainder of the same global order, sharded the
same way. Because the position is global, resuming also works after changing the number of
ranks; with an unchanged world size (and ``start_index`` a multiple of it) each rank
continues exactly where its own sequence stopped.

Training needs the same number of samples on every rank (or collectives hang), so by
default (``even=True``) the order is padded by wrapping around to a multiple of ``N``, as
torch's ``DistributedSampler`` does, or truncated with ``drop_last=True``. Evaluation that
must see every image exactly once uses ``even=False`` (shards then differ by at most one).
"""

from __future__ import annotations

import math
from typing import Iterator, Sized

import torch


class ResumableDistributedSampler(torch.utils.data.Sampler[int]):
    """Sampler(num_replicas, rank, shuffle, seed, start_index) with ``set_epoch``.

    Args:
        data_source: the dataset, or its length as an int.
        num_replicas, rank: data-parallel world size and this rank (default: from
            ``torch.distributed`` when initialized, else 1 and 0).
        shuffle: permute each epoch (seeded ``seed + epoch``) or keep dataset order.
        seed: base seed, must be the same on all ranks.
        start_index: global samples already consumed in the first epoch iterated; it is
            cleared once ``set_epoch`` moves to another epoch.
        drop_last: truncate (instead of pad) to a multiple of ``num_replicas``.
        even: pad/truncate so every rank gets the same count (False: no duplicates).
    """

    def __init__(self, data_source: Sized | int, num_replicas: int | None = None,
                 rank: int | None = None, shuffle: bool = True, seed: int = 0,
                 start_index: int = 0, drop_last: bool = False, even: bool = True):
        n = data_source if isinstance(data_source, int) else len(data_source)
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if ready else 1)
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"ResumableDistributedSampler: need 0 <= rank < num_replicas, got "
                             f"rank={rank}, num_replicas={num_replicas}")
        if n < 0 or start_index < 0:
            raise ValueError(f"ResumableDistributedSampler: dataset length ({n}) and start_index "
                             f"({start_index}) must be >= 0")
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        self.shuffle, self.seed, self.drop_last, self.even = shuffle, seed, drop_last, even
        if even:
            self.total_size = (n // num_replicas if drop_last else math.ceil(n / num_replicas)) * num_replicas
        else:
            self.total_size = n
        if start_index > self.total_size:
            raise ValueError(f"ResumableDistributedSampler: start_index {start_index} is past the "
                             f"end of the epoch ({self.total_size} samples over all ranks)")
        self.epoch = 0
        self.start_index = start_index
        self._resume_epoch: int | None = None  # the epoch start_index belongs to, once known

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles); a pending ``start_index`` applies to the first one."""
        if self.start_index and self._resume_epoch is None:
            self._resume_epoch = epoch
        elif epoch != self._resume_epoch:
            self.start_index = 0
        self.epoch = epoch

    def global_order(self, epoch: int | None = None) -> list[int]:
        """The full, padded (or truncated) order of ``epoch`` shared by all ranks."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.total_size <= self.n:
            return order[: self.total_size]
        reps = math.ceil((self.total_size - self.n) / max(self.n, 1))
        return order + (order * reps)[: self.total_size - self.n]

    def __iter__(self) -> Iterator[int]:
        if self.start_index and self._resume_epoch is None:
            self._resume_epoch = self.epoch
        remaining = self.global_order()[self.start_index:]
        return iter(remaining[self.rank:: self.num_replicas])

    def __len__(self) -> int:
        remaining = self.total_size - self.start_index
        return max(0, math.ceil((remaining - self.rank) / self.num_replicas))
