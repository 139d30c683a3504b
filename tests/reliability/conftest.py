"""The reliability suite's world: one tiny synthetic corpus, ingested and labelled once per session.

32 synthetic person crops (4 identities) in 4 shards of 8, a random tiny open_clip model (2 blocks,
width 64) for labels, and a ``vit_micro`` at 32x16 for pre-training: every stage runs for real, in
seconds. helpers/reliability.py starts stages in child processes and kills them at chosen writes (the
tests' own hook, helpers/fault_injection.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.reliability import CORPUS, PER_SHARD, label_config, write_clip_dir


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`clasp synth` at its smallest: 4 identities, 32 LUPerson-style crops."""
    from pipeline.config import load_config
    from pipeline.synth import SynthConfig, write_world

    out = tmp_path_factory.mktemp("rel_world")
    overrides = [
        "identities=4",
        "seed=11",
        "quiet=true",
        "pa100k_images=10",
        "min_height=64",
        "max_height=96",
        "dense=[]",
    ]
    write_world(load_config(SynthConfig, overrides=overrides), out)
    return out


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_dir(tmp_path_factory.mktemp("rel_clip"))


@pytest.fixture(scope="session")
def labelled(world: Path, clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(root, label set id): the world's crops ingested (4 shards of 8) and labelled. Copy before changing it."""
    from labeling.label import run_labeling
    from pipeline.ingest import IngestConfig, ingest

    root = tmp_path_factory.mktemp("rel_root")
    ingest(IngestConfig(source=str(world / "luperson"), corpus=CORPUS, root=str(root), images_per_shard=PER_SHARD,
                        workers=1, quiet=True))  # fmt: skip
    return root, run_labeling(label_config(root, clip_dir)).labelset
