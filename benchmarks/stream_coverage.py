"""Epoch coverage of the pre-training stream at any scale, simulated with the real stream classes.

    .venv/bin/python -m benchmarks.stream_coverage --processes 8 --workers 10 --shards 418 \\
        --images-per-shard 10000 --batch-size 48 --shuffle-block 2000 --checkpoint-every 2000 --epochs 1 \\
        --resume-at 4321                                     # the shipped ViT-B config on 8 GPUs (LUPerson)

What is real: ``pretrain.data.StreamLayout`` (per-epoch shard order, split of every epoch among
processes x workers at sample granularity, resume positions), the ``SliceReader`` iteration over
read tasks (what a reader opens, from where, what it passes over) and ``BlockShuffle``. What is
stood in: the tar reader (``KeyReader`` yields a sample's global id instead of its bytes, and counts
the samples whose data a tar reader would read and those it would pass header-only), and the
DataLoader, whose documented in-order round robin (batch ``k`` of a process from worker
``k % workers``) is replayed here (tests/test_stream_coverage.py checks it against a real 2-process,
2-worker run).

The run is simulated twice: uninterrupted, and killed and resumed at every checkpoint (and at
``--resume-at``). Last line, JSON: ``images``, ``epochs``, ``never_seen`` (image x epoch pairs with
no yield), ``max_per_epoch`` / ``min_per_epoch`` (yields of one image in one epoch),
``read_amplification`` (samples whose data was read / samples yielded, uninterrupted run),
``read_amplification_resumed`` (the same for the resumed run: a killed reader's unconsumed read-ahead
is read again), ``resume_identical`` (the resumed run yields exactly the uninterrupted run's batches).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pretrain.data import BlockShuffle, ReadTask, Shard, Slice, SliceReader, StreamLayout


class KeyReader(SliceReader):
    """Stand-in tar reader: sample = its global image id; counts data reads and header-only passes."""

    def __init__(self, first_id: list[int], images: int) -> None:
        self.first_id, self.images = first_id, images
        self.data_reads = 0
        self.header_passes = 0

    def read_slice(self, task: ReadTask, piece: Slice, start: int, skip: set[int]) -> Iterator[dict[str, Any]]:
        self.header_passes += start + len(skip)  # a tar is walked from its first member
        # a key is the image's id in its epoch (epoch x images + image), so one array holds a whole run
        base = task.epoch * self.images + self.first_id[piece.shard]
        epoch, reader, shift = task.epoch, task.reader, piece.span_start - piece.start
        for i in range(start, piece.stop):
            if i not in skip:
                self.data_reads += 1  # counted as read, not when asked: a killed reader stops mid-slice
                yield {"epoch": epoch, "reader": reader, "pos": shift + i, "key": base + i}


def shard_sizes(shards: int, per_shard: int, uneven: float, seed: int) -> list[int]:
    """Image count per shard: all equal, or drawn in [per_shard x (1 - uneven), per_shard]."""
    if uneven <= 0:
        return [per_shard] * shards
    rng = np.random.default_rng(seed)
    return [int(v) for v in rng.integers(max(1, int(per_shard * (1 - uneven))), per_shard + 1, size=shards)]


def steps_for(layout: StreamLayout, epochs: int) -> int:
    """Steps until every reader has yielded its span of ``epochs`` epochs."""
    last = 0
    for reader in range(layout.readers):
        lo, hi = layout.span(reader)
        batches = -(-epochs * (hi - lo) // layout.batch_size)
        last = max(last, (batches - 1) * layout.workers + reader % layout.workers + 1)
    return last


def simulate(
    layout: StreamLayout, epochs: int, steps: int, restarts: list[int], from_first_restart: bool = False
) -> tuple[np.ndarray, KeyReader]:
    """Global batches of ``steps`` steps as (steps, processes x batch) ids ``epoch x images + image`` (-1: none),
    with the stream started afresh at every step in ``restarts`` (a kill and resume there). With
    ``from_first_restart`` the steps before the first restart are left at -1 (not simulated)."""
    n, b, w = layout.num_images, layout.batch_size, layout.workers
    first_id = np.concatenate([[0], np.cumsum([s.size for s in layout.shards])[:-1]]).tolist()
    reader = KeyReader(first_id, n)
    shuffle = BlockShuffle(layout)
    out = np.full((steps, layout.processes * b), -1, dtype=np.int64)
    cuts = sorted(s for s in set(restarts) if 0 < s < steps)
    bounds = [cuts[0] if cuts else 0, *cuts[1:], steps] if from_first_restart else [0, *cuts, steps]
    for start, stop in itertools.pairwise(bounds):
        streams = []
        for r in range(layout.readers):
            tasks = itertools.takewhile(lambda t: t.epoch < epochs, layout.tasks(r, start_batch=start))
            streams.append(iter(shuffle(reader(tasks))))
        for step in range(start, stop):
            for p in range(layout.processes):
                got = [s["key"] for s in itertools.islice(streams[p * w + step % w], b)]
                out[step, p * b : p * b + len(got)] = got
    return out, reader


def coverage(ids: np.ndarray, images: int, epochs: int) -> dict[str, int]:
    ids = ids[ids >= 0]
    counts = np.bincount(ids, minlength=images * epochs).reshape(epochs, images)
    return {
        "never_seen": int((counts == 0).sum()),
        "max_per_epoch": int(counts.max()),
        "min_per_epoch": int(counts.min()),
    }


def measure(
    *,
    processes: int,
    workers: int,
    shards: int,
    images_per_shard: int,
    batch_size: int,
    checkpoint_every: int,
    epochs: int,
    resume_at: int | None = None,
    shuffle_block: int = 2000,
    uneven: float = 0.0,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, Any]:
    """The figures of the module docstring for one setting."""
    sizes = shard_sizes(shards, images_per_shard, uneven, seed)
    layout = StreamLayout(
        tuple(Shard(f"shard-{i}.tar", f"shard-{i}.parquet", n) for i, n in enumerate(sizes)),
        processes=processes, workers=max(1, workers), batch_size=batch_size, seed=seed, block=max(1, shuffle_block),
    )  # fmt: skip
    steps = steps_for(layout, epochs)
    if not quiet:
        print(
            f"{layout.num_images} images in {len(sizes)} shards, {layout.readers} readers "
            f"({processes} processes x {layout.workers}), global batch {processes * batch_size}, "
            f"{steps} steps for {epochs} epoch(s)"
        )
    t0 = time.perf_counter()
    plain, plain_reader = simulate(layout, epochs, steps, [])
    t1 = time.perf_counter()
    restarts = sorted({*range(checkpoint_every, steps, checkpoint_every), *([resume_at] if resume_at else [])})
    restarts = [r for r in restarts if 0 < r < steps]
    yielded = int((plain >= 0).sum())
    identical, amplification_resumed = None, None  # no checkpoint inside the run: nothing was resumed
    if restarts:
        resumed, resumed_reader = simulate(layout, epochs, steps, restarts, from_first_restart=True)
        first = restarts[0]
        resumed[:first] = plain[:first]  # until the first kill the two runs are the same run
        identical = bool(np.array_equal(plain, resumed))
        amplification_resumed = round((resumed_reader.data_reads + int((plain[:first] >= 0).sum())) / yielded, 4)
    elif not quiet:
        print(f"no checkpoint or --resume-at falls inside the {steps} steps: resume not simulated")
    t2 = time.perf_counter()
    if not quiet:
        print(
            f"simulated {steps} steps: uninterrupted in {t1 - t0:.1f} s, "
            f"resumed at {len(restarts)} step(s) in {t2 - t1:.1f} s"
        )
    return {
        "images": layout.num_images,
        "epochs": epochs,
        **coverage(plain, layout.num_images, epochs),
        "read_amplification": round(plain_reader.data_reads / yielded, 4),
        "read_amplification_resumed": amplification_resumed,
        "header_only_passes": plain_reader.header_passes,
        "resume_identical": identical,
        "resumed_at": restarts if len(restarts) <= 20 else [*restarts[:20], "..."],
        "steps": steps,
        "processes": processes,
        "workers": layout.workers,
        "readers": layout.readers,
        "seconds": round(t2 - t0, 2),
        "_batches": plain,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=8, help="processes of all nodes (GPUs)")
    p.add_argument("--workers", type=int, default=10, help="DataLoader workers per process (0 = reads itself)")
    p.add_argument("--shards", type=int, default=418)
    p.add_argument("--images-per-shard", type=int, default=10000)
    p.add_argument("--uneven", type=float, default=0.0, help="shard sizes drawn in [N x (1 - uneven), N]")
    p.add_argument("--batch-size", type=int, default=48, help="images per process per step")
    p.add_argument("--shuffle-block", type=int, default=2000, help="data.shuffle_buffer")
    p.add_argument("--checkpoint-every", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--resume-at", type=int, default=None, help="also kill and resume at this step")
    p.add_argument("--seed", type=int, default=0)
    figures = measure(**vars(p.parse_args()))
    figures.pop("_batches")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
