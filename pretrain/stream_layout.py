"""The epoch layout of the pre-training stream: which reader reads which samples of every epoch, in which
order, and where a resumed run's readers start (``pretrain.data`` explains the guarantees)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ClaspError
from pretrain.labelsets import Shard


@dataclass(frozen=True)
class StreamLayout:
    """How every epoch is cut among all readers (``processes x workers``); identical in every process.

    Epoch ``e`` is the shards in a permutation seeded by (seed, e), concatenated: ``num_images``
    positions. Reader ``r = rank x workers + worker`` owns the contiguous positions
    ``[N r / R, N (r + 1) / R)`` of it (its *span*), so a reader opens only the one to few shards its
    span touches, and a shard is cut between readers at sample granularity where needed. Within its
    span a reader yields blocks of ``block`` positions, each in an order seeded by (seed, e, r, block).
    A reader runs through its span of epoch 0, then of epoch 1, ... without pause: its batches of
    ``batch_size`` can hold the end of one epoch and the start of the next, and no image is dropped.
    """

    shards: tuple[Shard, ...]
    processes: int
    workers: int  # readers per process: DataLoader workers, or 1 when the process reads itself
    batch_size: int
    seed: int
    block: int = 1000

    def __post_init__(self) -> None:
        if self.num_images < self.readers:
            raise ClaspError(
                f"{self.num_images} images cannot be split among {self.readers} readers ({self.processes} process(es) "
                f"x {self.workers} data.workers): lower data.workers"
            )

    @property
    def readers(self) -> int:
        return self.processes * self.workers

    @property
    def num_images(self) -> int:
        return sum(s.size for s in self.shards)

    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.shards))

    def span(self, reader: int) -> tuple[int, int]:
        """Positions ``[lo, hi)`` of every epoch that ``reader`` yields."""
        n, r = self.num_images, self.readers
        return n * reader // r, n * (reader + 1) // r

    def slices(self, epoch: int, reader: int) -> tuple[Slice, ...]:
        """The shard pieces of ``reader``'s span in epoch ``epoch``, in span order."""
        lo, hi = self.span(reader)
        out, at = [], 0
        for shard in self.shard_order(epoch):
            size = self.shards[shard].size
            a, b = max(lo, at), min(hi, at + size)
            if a < b:
                out.append(Slice(int(shard), a - at, b - at, a - lo))
            at += size
            if at >= hi:
                break
        return tuple(out)

    def block_order(self, epoch: int, reader: int, block: int) -> np.ndarray:
        """Order in which the positions of one block of a reader's span are yielded (offsets into the block)."""
        lo, hi = self.span(reader)
        n = min(self.block, hi - lo - block * self.block)
        return np.random.default_rng([self.seed, epoch, reader, block, 2]).permutation(n)

    def reader_of(self, rank: int, worker: int) -> int:
        return rank * self.workers + worker

    def consumed(self, reader: int, batches: int) -> int:
        """Samples ``reader`` has handed out once its process took ``batches`` batches.

        A process's DataLoader takes batch ``k`` from worker ``k % workers`` (in-order round robin over
        workers that never run dry), so the count follows from the batch index alone. (An image that does
        not decode is skipped and shifts its reader by one; ingest keeps such images out of the shards.)
        """
        worker = reader % self.workers
        return max(0, -(-(batches - worker) // self.workers)) * self.batch_size

    def tasks(self, reader: int, start_batch: int, first_epoch: int = 0) -> Iterator[ReadTask]:
        """What ``reader`` reads, epoch after epoch, from where its process stood after ``start_batch`` batches
        of a stream that began at epoch ``first_epoch``."""
        lo, hi = self.span(reader)
        epoch, offset = divmod(self.consumed(reader, start_batch), hi - lo)
        epoch += first_epoch
        block, taken = divmod(offset, self.block)
        skip = frozenset((block * self.block + self.block_order(epoch, reader, block)[:taken]).tolist())
        yield ReadTask(epoch, reader, self.slices(epoch, reader), block * self.block, skip)
        for later in itertools.count(epoch + 1):
            yield ReadTask(later, reader, self.slices(later, reader), 0, frozenset())


@dataclass(frozen=True)
class Slice:
    """Samples ``start..stop-1`` of shard number ``shard``; ``span_start``: where ``start`` is in the reader's span."""

    shard: int
    start: int
    stop: int
    span_start: int


@dataclass(frozen=True)
class ReadTask:
    """One reader's share of one epoch: its slices, read from span position ``first`` on, less ``skip``
    (the positions of a partly yielded block that a resumed run already consumed)."""

    epoch: int
    reader: int
    slices: tuple[Slice, ...]
    first: int
    skip: frozenset[int]


@dataclass
class StreamPosition:
    """Batches this process has already consumed, and the epoch the stream began with (set before ``iter(loader)``)."""

    start_batch: int = 0
    first_epoch: int = 0
