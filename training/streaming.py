"""Streaming over shards for every trainer: deterministic split, equal batches, seeded shuffle, resume.

An epoch is planned before any data is read, from the shard list and each shard's sample count:
  1. the shards are put in an order seeded by (seed, epoch);
  2. their samples, concatenated in that order, are cut into `slots` = world_size × num_workers
     contiguous ranges of the same length L (rounded down to whole batches), one per
     (rank, dataloader worker); the few samples left over are dropped for this epoch only;
  3. each slot reads just its range and passes it through a shuffle buffer seeded by (seed, epoch, slot).
So every rank yields the same number of batches (no DDP hang on uneven shards) and no sample is seen
twice in an epoch, on any number of nodes. With DataLoader's in-order round robin, batch b of an
epoch comes from slot b mod W of its rank; after `skip_batches` batches a resumed stream rotates its
workers so that its first batch is exactly the one an uninterrupted run would have yielded next.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info


@dataclass(frozen=True)
class Shard:
    """One shard: where it is and how many samples it holds. With `keep` (a view's kept keys of this shard,
    embeddings/views.py) a reader passes over every other sample before counting positions, and `count`
    counts the kept ones, so the plan below splits and resumes a view exactly as it does whole shards."""

    path: str
    count: int
    keep: frozenset[str] | None = None

    def keeps(self, key: str) -> bool:
        """Whether the sample `key` is read (always, without a view)."""
        return self.keep is None or key in self.keep


def rank_and_world() -> tuple[int, int]:
    """This process's global rank and the world size (torch.distributed, else RANK/WORLD_SIZE, else 0/1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def plan_epoch(
    shards: list[Shard], epoch: int, seed: int, slots: int, batch_size: int
) -> list[list[tuple[int, int, int]]]:
    """Per slot, the (shard index, start, stop) ranges it reads this epoch; all slots hold equal counts."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    total = sum(s.count for s in shards)
    per_slot = (total // slots) // batch_size * batch_size
    if per_slot == 0:
        raise ValueError(
            f"{total} samples cannot give each of {slots} slots (ranks × workers) one batch of {batch_size}: "
            "use fewer workers or a smaller batch"
        )
    plan, slot, taken = [[] for _ in range(slots)], 0, 0
    for index in order:
        start = 0
        while start < shards[index].count and slot < slots:
            stop = min(shards[index].count, start + per_slot - taken)
            plan[slot].append((int(index), start, stop))
            taken += stop - start
            start = stop
            if taken == per_slot:
                slot, taken = slot + 1, 0
    return plan


def shuffled(records: Iterator[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer: fill to `buffer_size`, then emit a random element for each one read."""
    buffer: list[Any] = []
    picks: list[int] = []  # random slots drawn in blocks: one generator call per 4096 records
    for record in records:
        if len(buffer) < buffer_size:
            buffer.append(record)
            continue
        if not picks:
            picks = rng.integers(buffer_size, size=4096).tolist()[::-1]
        i = picks.pop()
        yield buffer[i]
        buffer[i] = record
    rng.shuffle(buffer)
    yield from buffer


def consumed_by_slot(slot: int, workers: int, batches: int) -> int:
    """Batches that worker-slot `slot` had yielded when the loader had yielded `batches` in order."""
    return batches // workers + (1 if slot < batches % workers else 0)


class ShardStream(IterableDataset):
    """Samples of a list of shards, planned per epoch as described in the module docstring.

    `read(shard, start, stop)` yields raw records of one shard's range, cheap to skip;
    `decode(record)` turns a record into a sample (decoding happens after shuffling and skipping).
    """

    def __init__(
        self,
        shards: list[Shard],
        read: Callable[[Shard, int, int], Iterator[Any]],
        decode: Callable[[Any], Any],
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        shuffle_buffer: int = 1000,
        skip_batches: int = 0,
        num_workers: int = 0,
    ):
        self.shards, self.read, self.decode = shards, read, decode
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.shuffle_buffer, self.skip_batches = shuffle_buffer, skip_batches
        self.num_workers = max(1, num_workers)
        rank, world = rank_and_world()
        self.rank, self.world = rank, world
        self.plan = plan_epoch(shards, epoch, seed, world * self.num_workers, batch_size)

    @property
    def samples_per_slot(self) -> int:
        return sum(stop - start for _, start, stop in self.plan[0])

    def batches_per_epoch(self) -> int:
        """Batches each rank yields in a whole epoch (the same on every rank)."""
        return self.samples_per_slot // self.batch_size * self.num_workers

    def __len__(self) -> int:
        """Samples of this rank's whole epoch, so len(DataLoader) is its batches; a resumed stream
        yields only the last (len - skip) of them, and the trainer's own batch count supplies the rest."""
        return self.batches_per_epoch() * self.batch_size

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        if workers != self.num_workers:
            raise RuntimeError(f"ShardStream planned for {self.num_workers} workers but runs in {workers}")
        # Rotate roles so the loader's first batch is the one an uninterrupted epoch yields next.
        role = (worker + self.skip_batches) % workers
        slot = self.rank * workers + role
        skip = consumed_by_slot(role, workers, self.skip_batches) * self.batch_size
        records = itertools.chain.from_iterable(
            self.read(self.shards[i], start, stop) for i, start, stop in self.plan[slot]
        )
        rng = np.random.default_rng([self.seed, self.epoch, slot])
        yield from map(self.decode, itertools.islice(shuffled(records, self.shuffle_buffer, rng), skip, None))
