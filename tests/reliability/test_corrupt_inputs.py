"""Damaged inputs: bad images are skipped and counted; damaged shards, foreign or reordered label sets and a
missing labelset.json are refused with one line that names the file and the fix, and a rerun repairs.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.reliability import CORPUS, PER_SHARD, assert_user_error, clasp_in_process, label_config, pretrain_overrides

from labeling import label as label_stage
from pipeline.errors import ClaspError
from pipeline.formats import LABELSET_FILE, image_shard_path, images_dir, label_shard_path, labels_dir
from pipeline.ingest import IngestConfig, ingest


def ingest_cfg(source: Path, root: Path, **kw: object) -> IngestConfig:
    args = dict(source=str(source), corpus=CORPUS, root=str(root), images_per_shard=PER_SHARD, workers=1, quiet=True)
    return IngestConfig(**{**args, **kw})


def copy_corpus(labelled: tuple[Path, str], dst: Path, *, labels: bool = True) -> Path:
    root, _ = labelled
    shutil.copytree(images_dir(root, CORPUS), images_dir(dst, CORPUS))
    if labels:
        shutil.copytree(root / CORPUS / "labels", dst / CORPUS / "labels")
    return dst


def pretrain_error(root: Path, out: Path, *extra: str) -> str:
    """`clasp pretrain` on ``root``: must exit 2 with one line; returns it."""
    args = ["pretrain", *pretrain_overrides(root, out, "max_steps=1", *extra)]
    return assert_user_error(clasp_in_process(*args))


def test_bad_images_are_skipped_logged_and_counted(world: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = shutil.copytree(world / "luperson", tmp_path / "src")
    good = sorted(source.rglob("*.jpg"))
    folder = good[0].parent
    (folder / "truncated.jpg").write_bytes(good[0].read_bytes()[:-200])  # cut inside the scan data
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_bytes(b"camera 3 was out of focus on Tuesday\n")
    summary = ingest(ingest_cfg(source, tmp_path / "root", quiet=False))
    printed = capsys.readouterr().out
    assert summary.rejects == 3 and summary.images == len(good)
    assert "3 rejected (see rejects.csv)" in printed
    with open(images_dir(tmp_path / "root", CORPUS) / "rejects.csv") as fh:
        rejects = {Path(row["source"]).name: row["reason"] for row in csv.DictReader(fh)}
    assert rejects == {
        "truncated.jpg": "truncated JPEG (no end-of-image marker after the scan data)",
        "empty.jpg": "empty file",
        "notes.jpg": "not an image (unrecognised header)",
    }


def test_truncated_tar_shard_is_refused_then_repaired_by_ingest(
    world: Path, labelled: tuple[Path, str], clip_dir: Path, tmp_path: Path
) -> None:
    root = copy_corpus(labelled, tmp_path, labels=False)
    shard = image_shard_path(root, CORPUS, 1)
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])  # a copy cut short

    with pytest.raises(ClaspError) as refused:
        label_stage.run_labeling(label_config(root, clip_dir))
    message = str(refused.value)
    assert "\n" not in message and str(shard) in message and "re-ingest" in message

    # the same ingest again notices the short tar (size recorded beside it) and rewrites exactly that shard
    summary = ingest(ingest_cfg(world / "luperson", root))
    assert summary.shards_skipped == 3 and shard.read_bytes() == intact


def test_truncated_tar_shard_stops_pretraining_with_its_name(labelled: tuple[Path, str], tmp_path: Path) -> None:
    root = copy_corpus(labelled, tmp_path / "root")
    for i in range(4):  # every shard: whichever the stream opens first is damaged
        shard = image_shard_path(root, CORPUS, i)
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    line = pretrain_error(root, tmp_path / "run")
    assert "is damaged" in line and f"{CORPUS}-00000" in line and "re-run `clasp ingest`" in line


def test_corrupt_label_shard_is_refused_then_relabelled(
    labelled: tuple[Path, str], clip_dir: Path, tmp_path: Path
) -> None:
    root = copy_corpus(labelled, tmp_path / "root")
    set_id = labelled[1]
    shard = label_shard_path(root, CORPUS, set_id, 2)
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])
    line = pretrain_error(root, tmp_path / "run")
    assert str(shard) in line and "unreadable" in line and "re-run `clasp label`" in line

    run = label_stage.run_labeling(label_config(root, clip_dir))
    assert run.labelset == set_id
    assert run.images == PER_SHARD  # only the damaged shard was labelled again
    assert shard.read_bytes() == intact


def test_labels_of_another_ingest_are_refused(world: Path, labelled: tuple[Path, str], tmp_path: Path) -> None:
    # same images, same shard sizes, another shuffle seed: every count matches, the keys do not
    root = tmp_path / "root"
    ingest(ingest_cfg(world / "luperson", root, seed=1))
    shutil.copytree(labelled[0] / CORPUS / "labels", root / CORPUS / "labels")
    line = pretrain_error(root, tmp_path / "run", "data.workers=1")  # raised in a loader worker: still one line
    assert "LabelMismatch" not in line and "not made from this ingest" in line
    assert f"{CORPUS}-00000" in line and ".parquet" in line and "re-run `clasp label`" in line


def test_labels_with_a_different_row_count_are_refused(labelled: tuple[Path, str], tmp_path: Path) -> None:
    root = copy_corpus(labelled, tmp_path / "root")
    shard = label_shard_path(root, CORPUS, labelled[1], 3)
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, PER_SHARD - 1).replace_schema_metadata(table.schema.metadata), shard)
    line = pretrain_error(root, tmp_path / "run")
    assert str(shard) in line and "7 rows" in line and "different ingest" in line


def test_label_rows_out_of_order_are_refused(labelled: tuple[Path, str], tmp_path: Path) -> None:
    root = copy_corpus(labelled, tmp_path / "root")
    for i in range(4):  # reverse every shard, so the first one read is out of order
        shard = label_shard_path(root, CORPUS, labelled[1], i)
        table = pq.read_table(shard)
        buf = io.BytesIO()
        pq.write_table(table.take(list(range(PER_SHARD))[::-1]), buf)
        shard.write_bytes(buf.getvalue())
    line = pretrain_error(root, tmp_path / "run")
    assert "out of order" in line and "row 0" in line and "re-run `clasp label`" in line


def test_missing_labelset_json_is_refused(labelled: tuple[Path, str], tmp_path: Path) -> None:
    root = copy_corpus(labelled, tmp_path / "root")
    doc = labels_dir(root, CORPUS, labelled[1]) / LABELSET_FILE
    doc.unlink()
    line = pretrain_error(root, tmp_path / "run", f"data.labelset={labelled[1]}")
    assert str(doc) in line and "run `clasp label`" in line
    line = pretrain_error(root, tmp_path / "run")  # no label set named: none is complete
    assert str(labels_dir(root, CORPUS)) in line and f"clasp label --corpus {CORPUS}" in line
