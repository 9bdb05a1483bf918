"""The streaming plan: disjoint, equal per slot, seeded per epoch; resume continues with the next batch."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from training.streaming import Shard, ShardStream, consumed_by_slot, plan_epoch, shuffled

SHARDS = [Shard(f"s{i}", n) for i, n in enumerate([50, 7, 33, 50, 21])]  # odd count, uneven sizes


def _read(shard, start, stop):
    return ((shard.path, i) for i in range(start, stop))


def _ids(plan, shards):
    return [[(shards[i].path, j) for i, a, b in slot for j in range(a, b)] for slot in plan]


@pytest.mark.parametrize("slots", [1, 2, 3, 4])
def test_plan_is_disjoint_and_equal(slots):
    plan = plan_epoch(SHARDS, epoch=0, seed=0, slots=slots, batch_size=4)
    ids = _ids(plan, SHARDS)
    lengths = {len(s) for s in ids}
    assert len(lengths) == 1 and lengths.pop() % 4 == 0
    flat = list(itertools.chain(*ids))
    assert len(flat) == len(set(flat)) and len(flat) > sum(s.count for s in SHARDS) - slots * 4


def test_plan_changes_with_the_epoch_and_not_with_the_run():
    a, b = plan_epoch(SHARDS, 0, 0, 2, 4), plan_epoch(SHARDS, 1, 0, 2, 4)
    assert a == plan_epoch(SHARDS, 0, 0, 2, 4) and a != b


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot give each of 8 slots"):
        plan_epoch([Shard("a", 10)], 0, 0, 8, 4)


def test_shuffle_buffer_permutes_and_keeps_everything():
    import numpy as np

    out = list(shuffled(iter(range(100)), 10, np.random.default_rng(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))


def test_consumed_by_slot_adds_up():
    for workers, batches in [(1, 5), (2, 5), (3, 7), (4, 8)]:
        assert sum(consumed_by_slot(s, workers, batches) for s in range(workers)) == batches


def _batches(workers, skip=0, epoch=0):
    stream = ShardStream(
        SHARDS,
        _read,
        lambda r: torch.tensor([int(r[0][1:]), r[1]]),
        batch_size=4,
        seed=3,
        epoch=epoch,
        shuffle_buffer=16,
        skip_batches=skip,
        num_workers=workers,
    )
    return [b.tolist() for b in DataLoader(stream, batch_size=4, num_workers=workers)]


@pytest.mark.parametrize("workers", [1, 2])
def test_resumed_stream_yields_the_remaining_batches_in_order(workers):
    full = _batches(workers)
    assert len(full) == ShardStream(SHARDS, _read, lambda r: r, 4, seed=3, num_workers=workers).batches_per_epoch()
    for skip in (1, 3):
        assert _batches(workers, skip=skip) == full[skip:]


def test_ranks_see_disjoint_samples_and_equal_batches(monkeypatch):
    seen, counts = [], []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        batches = _batches(2)
        counts.append(len(batches))
        seen += [tuple(x) for b in batches for x in b]
    assert len(set(counts)) == 1 and len(seen) == len(set(seen))
