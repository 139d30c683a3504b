"""The ground-truth label set: the CLIP set's twin with the synthetic world's truth in every column."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_label import label_cfg, write_clip_dir

from labeling.label import run_labeling
from labeling.oracle import cell_parts, write_gt_labelset
from pipeline.errors import ClaspError
from pipeline.formats import LABELSET_FILE, labels_dir


def test_cell_parts_takes_the_majority_class_and_its_share() -> None:
    mask = np.zeros((4, 4), np.uint8)
    mask[0:2, 0:2] = [[3, 3], [3, 1]]  # cell (0, 0): 3 of 4 pixels are class 3
    mask[2:4, 2:4] = 5  # cell (1, 1): all class 5
    cls, share = cell_parts(mask, (2, 2), 9)
    assert cls.tolist() == [[3, 0], [0, 5]]
    assert share.tolist() == [[0.75, 1.0], [1.0, 1.0]]


def test_gt_labelset_mirrors_the_clip_set_and_holds_the_truth(
    ingested: tuple[Path, str], synth_world: Path, tmp_path: Path
) -> None:
    root, corpus = ingested
    clip = write_clip_dir(tmp_path / "clip")
    source = run_labeling(label_cfg(root, corpus, clip, resolution=(64, 32)))
    set_id = write_gt_labelset(root, corpus, source, synth_world / "gt.parquet")
    assert set_id.startswith("gt-")
    assert write_gt_labelset(root, corpus, source, synth_world / "gt.parquet") == set_id  # reused
    src, out = labels_dir(root, corpus, source), labels_dir(root, corpus, set_id)
    header = json.loads((out / LABELSET_FILE).read_text())
    assert header["ground_truth"] is True and "not CLIP" in header["warning"]
    assert header["grid"] == json.loads((src / LABELSET_FILE).read_text())["grid"]
    gt = pq.read_table(synth_world / "gt.parquet").to_pydict()
    by_key = {k: i for i, k in enumerate(gt["key"])}
    gh, gw = header["grid"]
    for shard in header["shards"]:
        a, b = pq.read_table(src / shard), pq.read_table(out / shard)
        assert a.column("key").to_pylist() == b.column("key").to_pylist()
        assert a.schema.equals(b.schema, check_metadata=False)
        row = b.slice(0, 1).to_pylist()[0]
        i = by_key[row["key"]]
        assert [v // 255 for v in row["attr_prob"]] == list(gt["attributes"][i])
        mask = np.asarray(Image.open(io.BytesIO(gt["part_mask"][i])))
        expected, _ = cell_parts(mask, (gh, gw), 9)
        assert np.frombuffer(row["part_map"], np.uint8).reshape(gh, gw).tolist() == expected.tolist()
        assert row["fg_ratio"] == pytest.approx((expected > 0).mean())


def test_gt_labelset_needs_a_complete_source(ingested: tuple[Path, str], synth_world: Path) -> None:
    root, corpus = ingested
    with pytest.raises(ClaspError, match="not complete"):
        write_gt_labelset(root, corpus, "no-such-set", synth_world / "gt.parquet")


def test_latest_labelset_never_picks_a_ground_truth_set(tmp_path: Path) -> None:
    import os

    from pipeline.formats import latest_labelset

    for name, gt in (("clipset", False), ("gt-1234", True)):
        d = labels_dir(tmp_path, "c", name)
        d.mkdir(parents=True)
        (d / LABELSET_FILE).write_text(json.dumps({"labelset": name, "ground_truth": gt}))
    os.utime(labels_dir(tmp_path, "c", "gt-1234") / LABELSET_FILE, (2e9, 2e9))  # newest
    assert latest_labelset(tmp_path, "c") == "clipset"
