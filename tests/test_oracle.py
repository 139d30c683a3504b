"""The ground-truth label set: the CLIP set's twin with the synthetic world's truth in every column."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.labels import label_cfg, write_clip_dir
from PIL import Image

from labeling.label import run_labeling
from labeling.oracle import cell_parts, degrade_mask, write_gt_labelset
from pipeline.errors import ClaspError
from pipeline.formats import LABELSET_FILE, labels_dir


def test_cell_parts_takes_the_majority_class_and_its_share() -> None:
    mask = np.zeros((4, 4), np.uint8)
    mask[0:2, 0:2] = [[3, 3], [3, 1]]  # cell (0, 0): 3 of 4 pixels are class 3
    mask[2:4, 2:4] = 5  # cell (1, 1): all class 5
    cls, share = cell_parts(mask, (2, 2), 9)
    assert cls.tolist() == [[3, 0], [0, 5]]
    assert share.tolist() == [[0.75, 1.0], [1.0, 1.0]]


@pytest.fixture
def clip_labelset(ingested: tuple[Path, str], tmp_path: Path) -> str:
    """A complete CLIP label set of the ingested corpus (the set a ground-truth twin mirrors)."""
    root, corpus = ingested
    return run_labeling(label_cfg(root, corpus, write_clip_dir(tmp_path / "clip"), resolution=(64, 32))).labelset


def test_gt_labelset_mirrors_the_clip_set_and_holds_the_truth(
    ingested: tuple[Path, str], synth_world: Path, clip_labelset: str
) -> None:
    root, corpus = ingested
    source = clip_labelset
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


def test_gt_labelset_id_follows_the_truth_content_not_its_file_time(
    ingested: tuple[Path, str], synth_world: Path, clip_labelset: str, tmp_path: Path
) -> None:
    root, corpus = ingested
    source = clip_labelset
    gt = tmp_path / "gt.parquet"
    gt.write_bytes((synth_world / "gt.parquet").read_bytes())
    first = write_gt_labelset(root, corpus, source, gt)
    os.utime(gt, ns=(1, 1))  # a regenerated identical world: same bytes, another file time
    assert write_gt_labelset(root, corpus, source, gt) == first
    table = pq.read_table(gt)
    flipped = pa.array([[1 - v for v in a] for a in table.column("attributes").to_pylist()],
                       type=table.schema.field("attributes").type)  # fmt: skip
    pq.write_table(table.set_column(table.schema.get_field_index("attributes"), "attributes", flipped), gt)
    assert write_gt_labelset(root, corpus, source, gt) != first  # other truth, other set


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


def test_degrade_mask_shifts_boundaries_and_swaps_classes() -> None:
    mask = np.zeros((40, 20), np.uint8)
    mask[10:30, 5:15] = 3
    rng = np.random.default_rng(0)
    assert degrade_mask(mask, 0.0, 9, rng) is mask
    noisy = [degrade_mask(mask, 1.0, 9, np.random.default_rng(s)) for s in range(8)]
    assert all(3 not in m for m in noisy)  # level 1: every foreground class is swapped for another
    assert all(set(np.unique(m)) - {0} for m in noisy)  # ... but stays foreground
    assert len({(m > 0).tobytes() for m in noisy}) > 1  # boundaries moved, differently per draw


def test_noisy_gt_labelset_flips_attributes_at_the_asked_rate(
    ingested: tuple[Path, str], synth_world: Path, clip_labelset: str
) -> None:
    root, corpus = ingested
    source = clip_labelset
    clean = write_gt_labelset(root, corpus, source, synth_world / "gt.parquet")
    noisy = write_gt_labelset(root, corpus, source, synth_world / "gt.parquet", attr_flip=0.3, part_noise=0.5)
    assert noisy != clean and noisy.startswith("gt-")
    assert write_gt_labelset(root, corpus, source, synth_world / "gt.parquet", attr_flip=0.3, part_noise=0.5) == noisy
    header = json.loads((labels_dir(root, corpus, noisy) / LABELSET_FILE).read_text())
    assert header["noise"] == {"attr_flip": 0.3, "part_noise": 0.5, "seed": 0}

    def column(set_id: str, name: str) -> list:
        d = labels_dir(root, corpus, set_id)
        return [v for shard in sorted(header["shards"]) for v in pq.read_table(d / shard).column(name).to_pylist()]

    a, b = np.array(column(clean, "attr_prob")), np.array(column(noisy, "attr_prob"))
    assert 0.25 < (a != b).mean() < 0.35
    assert column(clean, "part_map") != column(noisy, "part_map")
    with pytest.raises(ClaspError, match="noise must lie in"):
        write_gt_labelset(root, corpus, source, synth_world / "gt.parquet", attr_flip=1.5)
