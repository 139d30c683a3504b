"""An epoch is every image once, and a resume continues it exactly: the stream simulator on odd settings,
the simulator against the real stream (2 ranks x 2 DataLoader workers), and the figures failing on a broken
split. The 2-process trainer run that checks the simulator end to end is in test_trainer.py.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
from helpers.pretraining import stream_for, tiny_config, write_corpus

from benchmarks.stream_coverage import measure
from pretrain.data import Shard, StreamLayout

ODD = {
    # more readers than shards: 3 processes x 2 workers over 2 shards (shards cut at sample granularity)
    "readers_gt_shards": dict(processes=3, workers=2, shards=2, images_per_shard=25, batch_size=3, shuffle_block=4),
    # shards of unequal size, a batch that divides nothing
    "unequal_shards": dict(
        processes=2, workers=3, shards=7, images_per_shard=20, uneven=0.6, batch_size=5, shuffle_block=7
    ),  # fmt: skip
    # one process reading alone (workers=0), block larger than a shard
    "single_reader": dict(processes=1, workers=0, shards=3, images_per_shard=11, batch_size=4, shuffle_block=50),
}


def assert_exact(figures: dict) -> None:
    assert figures["never_seen"] == 0
    assert figures["max_per_epoch"] == figures["min_per_epoch"] == 1
    assert figures["read_amplification"] <= 1.05
    assert figures["resume_identical"] is True


@pytest.mark.parametrize("name", sorted(ODD))
def test_every_image_once_per_epoch_and_exact_resume_on_odd_settings(name: str) -> None:
    figures = measure(**ODD[name], checkpoint_every=7, epochs=3, resume_at=10, quiet=True)
    assert_exact(figures)
    assert figures["resumed_at"][:2] == [7, 10]


def test_a_run_with_no_checkpoint_inside_reports_no_resume_figures() -> None:
    """A checkpoint interval (and --resume-at) beyond the run's steps resumes nothing: the resume figures are
    null rather than a vacuous ``true`` (and a read amplification counting the whole run twice)."""
    figures = measure(**ODD["unequal_shards"], checkpoint_every=10_000, epochs=1, quiet=True)
    assert figures["resumed_at"] == [] and figures["resume_identical"] is None
    assert figures["read_amplification_resumed"] is None and figures["never_seen"] == 0


def test_settings_nobody_chose() -> None:
    rng = random.Random(20261204)
    for _ in range(6):
        setting = dict(
            processes=rng.randint(1, 6), workers=rng.randint(0, 4), shards=rng.randint(1, 9),
            images_per_shard=rng.randint(8, 40), uneven=rng.choice([0.0, 0.5]), batch_size=rng.randint(1, 7),
            shuffle_block=rng.randint(1, 30), seed=rng.randint(0, 99),
        )  # fmt: skip
        readers = setting["processes"] * max(1, setting["workers"])
        if setting["shards"] * setting["images_per_shard"] // 2 < readers:
            setting["images_per_shard"] = readers * 2
        figures = measure(
            **setting, checkpoint_every=rng.randint(2, 9), epochs=2, resume_at=rng.randint(1, 20), quiet=True
        )
        assert_exact(figures)
        assert figures["steps"] > 2, setting


def test_the_figures_see_a_broken_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers whose spans overlap by one image: the simulator must report it (the check can fail)."""
    original = StreamLayout.span

    def overlapping(self: StreamLayout, reader: int) -> tuple[int, int]:
        lo, hi = original(self, reader)
        return max(0, lo - 1), hi

    monkeypatch.setattr(StreamLayout, "span", overlapping)
    figures = measure(**ODD["unequal_shards"], checkpoint_every=7, epochs=2, quiet=True)
    assert figures["max_per_epoch"] == 2


def test_spans_tile_the_epoch_and_follow_the_shard_order() -> None:
    shards = tuple(Shard(f"t{i}", f"l{i}", n) for i, n in enumerate([5, 9, 2, 7]))
    layout = StreamLayout(shards, processes=3, workers=2, batch_size=2, seed=4, block=3)
    for epoch in range(3):
        pieces = [p for r in range(layout.readers) for p in layout.slices(epoch, r)]
        covered = sorted((p.shard, i) for p in pieces for i in range(p.start, p.stop))
        assert covered == sorted((s, i) for s, sh in enumerate(shards) for i in range(sh.size))
        assert max(len(layout.slices(epoch, r)) for r in range(layout.readers)) <= 2  # a span opens 1-2 shards
    assert layout.shard_order(0).tolist() != layout.shard_order(1).tolist()  # shards permuted per epoch


def test_simulator_matches_the_real_stream_with_two_ranks_and_two_workers(tmp_path: Path) -> None:
    """The real loader (2 ranks x 2 DataLoader worker processes, 4 readers) yields, step by step, the keys
    the simulator predicts from the same layout: its round-robin model of the DataLoader holds."""
    root = write_corpus(tmp_path, shards=3, per_shard=10)  # 30 images: spans of 7-8, batches of 3
    cfg = tiny_config(root, "data.workers=2", "data.batch_size=3", "data.shuffle_buffer=4")
    streams = [stream_for(cfg, rank=r, world_size=2) for r in range(2)]
    steps = 12  # a bit over one epoch (30 / 6 = 5 steps): the epoch seam is inside
    batches = [list(itertools.islice(s.batches(), steps)) for s in streams]
    real = [sum((batches[r][step]["key"] for r in range(2)), []) for step in range(steps)]
    epochs = [sum((batches[r][step]["epoch"].tolist() for r in range(2)), []) for step in range(steps)]

    layout = streams[0].layout
    sim = measure(
        processes=2, workers=2, shards=3, images_per_shard=10, batch_size=3, shuffle_block=4, checkpoint_every=5,
        epochs=3, seed=cfg.seed, quiet=True,
    )["_batches"][:steps]  # fmt: skip
    keys = [f"img_{s:02d}_{i:03d}" for s in range(3) for i in range(10)]  # corpus order = simulator ids
    predicted = [[keys[v % layout.num_images] for v in row] for row in sim]
    assert real == predicted
    first_epoch = {k for row, ep in zip(real, epochs, strict=True) for k, e in zip(row, ep, strict=True) if e == 0}
    assert first_epoch == set(keys)
    assert np.array_equal(np.array(epochs), sim // layout.num_images)


def test_the_real_stream_resumed_every_two_batches_covers_each_epoch_once(tmp_path: Path) -> None:
    """As a run killed at every second step would read it: 40-image shards, 2 ranks, batches of 3 whose
    count per epoch is not whole. The resampled stream this replaced never read the tails of its shards."""
    root = write_corpus(tmp_path, shards=2, per_shard=20)
    cfg = tiny_config(root, "data.workers=0", "data.batch_size=3", "data.shuffle_buffer=5")
    streams = [stream_for(cfg, rank=r, world_size=2) for r in range(2)]
    seen: dict[int, list[str]] = {}
    for start in range(0, 16, 2):  # 16 steps x 6 images: two epochs of 40 and a bit
        for stream in streams:
            for batch in itertools.islice(stream.batches(start_batch=start), 2):
                for key, epoch in zip(batch["key"], batch["epoch"].tolist(), strict=True):
                    seen.setdefault(epoch, []).append(key)
    assert sorted(seen[0]) == sorted(seen[1]) == sorted(f"img_{s:02d}_{i:03d}" for s in range(2) for i in range(20))
