"""A resume keeps the run it resumes: a changed setting is refused (config.yaml untouched) unless accepted by
name, and ``data.labelset: null`` stays on the checkpoint's label set when a newer one appears."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers.pretraining import LABELSET, TINY_MODEL, tiny_config, write_corpus

from pipeline import formats
from pipeline.errors import ClaspError
from pretrain.trainer import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), shards=4, per_shard=8)


def test_a_changed_setting_is_refused_then_accepted_by_name(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(corpus, *TINY_MODEL, f"out={out}", "max_steps=2", "checkpoint_every=2"))
    original = (out / "config.yaml").read_text()
    with pytest.raises(ClaspError) as err:
        train(tiny_config(corpus, *TINY_MODEL, f"out={out}", "max_steps=4", "optim.lr=0.01"))
    line = str(err.value)
    assert "\n" not in line and "optim.lr was 0.0005, is 0.01 now" in line and "resume_accept=[optim.lr]" in line
    assert (out / "config.yaml").read_text() == original  # the run's settings are not overwritten

    summary = train(tiny_config(corpus, *TINY_MODEL, f"out={out}", "max_steps=4", "optim.lr=0.01",
                                "resume_accept=[optim.lr]"))  # fmt: skip
    assert summary.step == 4  # the step is kept: the global batch did not change
    assert (out / "config.before-step-000000002.yaml").read_text() == yaml.safe_dump(
        yaml.safe_load(original), sort_keys=False
    )
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.01


def test_a_null_labelset_resumes_with_the_pinned_one(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(corpus, root)
    out = tmp_path / "run"
    train(tiny_config(root, *TINY_MODEL, f"out={out}", "max_steps=2", "checkpoint_every=2"))
    # a newer, complete label set of the same corpus appears (a later `clasp label` with other prompts)
    old_dir = formats.labels_dir(root, "toy", LABELSET)
    new_dir = shutil.copytree(old_dir, formats.labels_dir(root, "toy", "newer000001"))
    doc = json.loads((new_dir / formats.LABELSET_FILE).read_text())
    (new_dir / formats.LABELSET_FILE).write_text(json.dumps({**doc, "labelset": "newer000001"}))
    later = (old_dir / formats.LABELSET_FILE).stat().st_mtime + 10
    os.utime(new_dir / formats.LABELSET_FILE, (later, later))
    assert formats.latest_labelset(root, "toy") == "newer000001"  # what labelset: null picks for a fresh run

    summary = train(tiny_config(root, *TINY_MODEL, f"out={out}", "max_steps=3"))
    ckpt = torch.load(summary.checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["identity"]["labelset"] == LABELSET and ckpt["config"]["data"]["labelset"] == LABELSET
    with pytest.raises(ClaspError, match="labelset was 'testset0001', is 'newer000001' now"):
        train(tiny_config(root, *TINY_MODEL, f"out={out}", "max_steps=4", "data.labelset=newer000001"))
