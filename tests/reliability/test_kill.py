"""kill -9 in the middle of every stage's writes; the rerun must equal a run that was never interrupted.

Each case starts the stage in a child process, stalls it inside a chosen atomic write (temporary
file complete, final name not yet there), sends SIGKILL, then reruns the stage and compares every
output with the session's uninterrupted run (the ``labelled`` fixture) byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tarfile
import time
from fnmatch import fnmatch
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers.reliability import (
    CORPUS,
    ingest_code,
    kill_at_write,
    label_code,
    label_config,
    pretrain_code,
    pretrain_config,
    start_python,
)

from labeling import label as label_stage
from pipeline.formats import LABELSET_FILE, MANIFEST_FILE, SIZES_FILE, images_dir, labels_dir
from pipeline.ingest import DUPLICATES_FILE, IngestConfig, ingest
from pipeline.sources import make_key
from pretrain.trainer import list_checkpoints, train

COMPARED = (MANIFEST_FILE, SIZES_FILE, "rejects.csv", DUPLICATES_FILE)


def tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return [m.name.split(".")[0] for m in tf if m.name.endswith((".jpg", ".png"))]


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".paused")]


@pytest.mark.parametrize(
    ("pattern", "nth"),
    [("*.tar", 3), (f"{CORPUS}-*.parquet", 2), (MANIFEST_FILE, 1)],
    ids=["third-shard", "second-shard-rows", "manifest"],
)
def test_ingest_killed_mid_write_resumes_to_identical_shards(
    world: Path, labelled: tuple[Path, str], tmp_path: Path, pattern: str, nth: int
) -> None:
    clean = images_dir(labelled[0], CORPUS)
    source = world / "luperson"
    stalled = kill_at_write(ingest_code(source, tmp_path), tmp_path, pattern, nth)
    out = images_dir(tmp_path, CORPUS)
    assert not (out / SIZES_FILE).exists(), "a killed ingest must not look complete"
    expected_done = 4 if pattern == MANIFEST_FILE else nth - 1  # shards are written in order with one worker
    assert len(list(out.glob("*.tar"))) == expected_done and fnmatch(stalled.name.split(".tmp-")[0], pattern)

    summary = ingest(IngestConfig(source=str(source), corpus=CORPUS, root=str(tmp_path), images_per_shard=8,
                                  workers=1, quiet=True))  # fmt: skip
    assert summary.shards_skipped == expected_done and summary.shards == 4
    names = sorted(p.name for p in clean.glob("*.tar")) + list(COMPARED)
    for name in names:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), f"{name} differs from the uninterrupted run"
    keys = pq.read_table(out / MANIFEST_FILE, columns=["key"]).column(0).to_pylist()
    assert len(keys) == len(set(keys)) == 32
    assert set(keys) == {make_key(p.relative_to(source).as_posix()) for p in source.rglob("*.jpg")}
    assert [k for name in sorted(p.name for p in out.glob("*.tar")) for k in tar_keys(out / name)] == keys
    assert not leftovers(out)


@pytest.mark.parametrize(("pattern", "nth"), [("*.parquet", 2), (LABELSET_FILE, 1)], ids=["second-shard", "labelset"])
def test_labeling_killed_mid_write_resumes_to_identical_labels(
    labelled: tuple[Path, str], clip_dir: Path, tmp_path: Path, pattern: str, nth: int
) -> None:
    clean_root, set_id = labelled
    shutil.copytree(images_dir(clean_root, CORPUS), images_dir(tmp_path, CORPUS))
    watch = tmp_path / CORPUS / "labels"
    stalled = kill_at_write(label_code(tmp_path, clip_dir), watch, pattern, nth)
    out, clean = labels_dir(tmp_path, CORPUS, set_id), labels_dir(clean_root, CORPUS, set_id)
    assert stalled.parent == out
    assert not (out / LABELSET_FILE).exists(), "a killed labeling run must not look complete"
    done = sorted(p.name for p in out.glob("*.parquet"))
    assert len(done) == (nth - 1 if pattern == "*.parquet" else 4)

    run = label_stage.run_labeling(label_config(tmp_path, clip_dir))
    assert run.labelset == set_id
    assert run.images == 32 - 8 * len(done)  # finished shards are not labelled again
    shards = sorted(p.name for p in clean.glob("*.parquet"))
    assert sorted(p.name for p in out.glob("*.parquet")) == shards and len(shards) == 4
    keys = []
    for name in shards:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), f"{name} differs from the uninterrupted run"
        keys += pq.read_table(out / name, columns=["key"]).column(0).to_pylist()
        assert keys[-8:] == tar_keys(images_dir(tmp_path, CORPUS) / name.replace(".parquet", ".tar"))
    assert len(keys) == len(set(keys)) == 32
    resumed_doc, clean_doc = (json.loads((d / LABELSET_FILE).read_text()) for d in (out, clean))
    for doc in (resumed_doc, clean_doc):  # what names the folder, and the git commit (others commit meanwhile)
        doc["config"].pop("root"), doc.pop("code_version")
    assert resumed_doc == clean_doc
    assert not leftovers(out)


def logged(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss/total"]) for r in rows]


def test_pretraining_killed_mid_checkpoint_resumes_on_the_same_trajectory(
    labelled: tuple[Path, str], tmp_path: Path
) -> None:
    root = labelled[0]
    schedule = ["checkpoint_every=1", "max_steps=4"]
    clean = train(pretrain_config(root, tmp_path / "clean", *schedule))
    assert clean.step == 4 and clean.steps_per_epoch == 8

    run = tmp_path / "killed"
    stalled = kill_at_write(pretrain_code(root, run, *schedule), run, "step-*.pt", 2)  # writing step-2
    assert stalled.name.startswith("step-000000002.pt.tmp-")
    assert [p.name for p in list_checkpoints(run)] == ["step-000000001.pt"]
    assert [s for s, _ in logged(run)] == [1, 2]  # it got past step 2 before dying

    resumed = train(pretrain_config(root, run, *schedule))  # resume=latest: from step 1, the last complete one
    assert resumed.step == 4
    a, b = logged(tmp_path / "clean"), logged(run)
    assert [s for s, _ in b] == [1, 2, 3, 4], "steps after the last checkpoint must not be logged twice"
    for (step, loss_a), (_, loss_b) in zip(a, b, strict=True):
        assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-6), (step, a, b)
    assert len({round(v, 4) for _, v in a}) == 4  # the loss moves, so equal trajectories mean something
    final_a = torch.load(clean.checkpoint, map_location="cpu", weights_only=True)["model"]
    final_b = torch.load(resumed.checkpoint, map_location="cpu", weights_only=True)["model"]
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        torch.testing.assert_close(final_b[name], final_a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not leftovers(run / "checkpoints")


@pytest.mark.slow
def test_pretraining_killed_between_checkpoints_resumes_on_the_same_trajectory(
    labelled: tuple[Path, str], tmp_path: Path
) -> None:
    """A kill at no particular write: as soon as step 3 is logged (mid-way between checkpoints 2 and 4)."""
    root = labelled[0]
    schedule = ["checkpoint_every=2", "max_steps=6"]
    run = tmp_path / "killed"
    proc = start_python(pretrain_code(root, run, *schedule))
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if (run / "log.jsonl").is_file() and len((run / "log.jsonl").read_text().splitlines()) >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"pre-training ended before it could be killed: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = list_checkpoints(run)[-1].name
    assert last in ("step-000000002.pt", "step-000000004.pt")  # wherever it died, one checkpoint was complete

    clean = train(pretrain_config(root, tmp_path / "clean", *schedule))
    resumed = train(pretrain_config(root, run, *schedule))
    assert resumed.step == clean.step == 6
    a, b = logged(tmp_path / "clean"), logged(run)
    assert [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    for (step, loss_a), (_, loss_b) in zip(a, b, strict=True):
        assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-6), (step, a, b)
