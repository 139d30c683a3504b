"""Shared, session-scoped fixtures: one small synthetic world and its ingested corpus.

Built once per test session (a few seconds) so every stage's tests run on the same data the
demo uses, through the same readers as real data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `clasp synth` output with 12 identities (LUPerson folder + LMDB, Market-1501, PA-100K, gt.parquet)."""
    from pipeline.config import load_config
    from pipeline.synth import SynthConfig, write_world

    out = tmp_path_factory.mktemp("synth_world")
    write_world(load_config(SynthConfig, overrides=["identities=12", "seed=7", "dense=[]"]), out)
    return out


@pytest.fixture(scope="session")
def ingested(synth_world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(root, corpus): the synthetic world's LUPerson folder ingested into a few WebDataset shards."""
    from pipeline.ingest import IngestConfig, ingest

    root = tmp_path_factory.mktemp("data_root")
    ingest(
        IngestConfig(
            source=str(synth_world / "luperson"),
            format="folder",
            corpus="synthetic",
            root=str(root),
            images_per_shard=64,
            seed=0,
            workers=1,
            quiet=True,
        )
    )
    return root, "synthetic"
