"""ResumableDistributedSampler against a brute-force expectation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from agvm_ds.data.sampler import ResumableDistributedSampler as Sampler


def expected_order(n, shuffle, seed, epoch, total):
    """Brute force: the epoch's permutation, wrapped around (or cut) to ``total`` items."""
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        base = torch.randperm(n, generator=g).tolist()
    else:
        base = list(range(n))
    return [base[i % n] for i in range(total)]


@pytest.mark.parametrize("n, world, shuffle, drop_last", [
    (10, 1, True, False), (10, 3, True, False), (10, 3, False, True), (7, 4, True, False),
    (12, 4, True, True), (5, 8, False, False)])
def test_matches_brute_force_for_every_epoch_and_rank(n, world, shuffle, drop_last):
    total = (n // world if drop_last else math.ceil(n / world)) * world
    for epoch in (0, 1, 5):
        expect = expected_order(n, shuffle, 17, epoch, total)
        shards = []
        for rank in range(world):
            s = Sampler(n, world, rank, shuffle=shuffle, seed=17, drop_last=drop_last)
            s.set_epoch(epoch)
            shard = list(s)
            assert len(shard) == len(s) == total // world  # even: same count on every rank
            assert shard == [expect[p] for p in range(rank, total, world)]
            shards.append(shard)
        merged = list(itertools.chain.from_iterable(shards))
        if not drop_last:
            assert set(merged) == set(range(n))  # covering
        if total == n:
            assert sorted(merged) == list(range(n))  # disjoint when nothing is padded


def test_uneven_mode_is_disjoint_and_covering():
    n, world = 11, 3
    shards = [list(Sampler(n, world, r, shuffle=True, seed=2, even=False)) for r in range(world)]
    assert sorted(itertools.chain.from_iterable(shards)) == list(range(n))
    assert [len(s) for s in shards] == [4, 4, 3]
    assert [len(Sampler(n, world, r, even=False)) for r in range(world)] == [4, 4, 3]


def test_epochs_differ_and_seed_matters():
    a, b = Sampler(50, 1, 0, seed=0), Sampler(50, 1, 0, seed=1)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(b) != first
    a.set_epoch(0)
    assert list(a) == first  # reproducible


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resume_yields_exactly_the_remaining_sequence(world):
    n, epoch = 23, 4
    for k in range(0, math.ceil(n / world) * world + 1, world):  # where a trainer can stop
        for rank in range(world):
            full = Sampler(n, world, rank, seed=9)
            full.set_epoch(epoch)
            uninterrupted = list(full)
            resumed = Sampler(n, world, rank, seed=9, start_index=k)
            resumed.set_epoch(epoch)
            assert list(resumed) == uninterrupted[k // world:]
            assert len(resumed) == len(uninterrupted) - k // world
            resumed.set_epoch(epoch + 1)  # the next epoch starts from the beginning again
            full.set_epoch(epoch + 1)
            assert list(resumed) == list(full)


def test_resume_with_a_different_world_size_continues_the_global_order():
    n, k = 20, 8
    expect = expected_order(n, True, 3, 2, n)[k:]
    shards = []
    for rank in range(4):  # trained on 2 ranks up to k, resumed on 4
        s = Sampler(n, 4, rank, seed=3, start_index=k)
        s.set_epoch(2)
        shards.append(list(s))
    assert [x for row in zip(*shards) for x in row] == expect


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        Sampler(10, 2, 2)
    with pytest.raises(ValueError, match="start_index 11 is past the end"):
        Sampler(10, 1, 0, start_index=11)


def test_works_with_dataloader():
    data = list(range(10))
    s = Sampler(data, 2, 1, shuffle=False, start_index=4)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=s)
    assert [b.tolist() for b in loader] == [[5, 7], [9]]
