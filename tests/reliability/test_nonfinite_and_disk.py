"""A non-finite loss stops training with the step, the loss terms and the last good checkpoint named, and the
run resumes from that checkpoint; every writing stage refuses to start when its outputs would not fit on disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers.reliability import (
    CORPUS,
    PER_SHARD,
    assert_user_error,
    clasp,
    clasp_in_process,
    label_config,
    pretrain_config,
    pretrain_overrides,
)

from labeling import label as label_stage
from pipeline.errors import ClaspError
from pipeline.formats import images_dir
from pipeline.guards import DISK_LIMIT_ENV
from pipeline.ingest import IngestConfig, ingest
from pretrain.export import export_backbone
from pretrain.trainer import list_checkpoints, train


@pytest.fixture(scope="module")
def one_step_run(labelled: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pre-training run with one optimizer step and its checkpoint. Copy before changing it."""
    out = tmp_path_factory.mktemp("one_step") / "run"
    train(pretrain_config(labelled[0], out, "max_steps=1", "checkpoint_every=1"))
    return out


def test_non_finite_loss_stops_naming_step_terms_and_checkpoint(
    labelled: tuple[Path, str], one_step_run: Path, tmp_path: Path
) -> None:
    run = shutil.copytree(one_step_run, tmp_path / "run")
    # std 0 turns every normalised pixel into inf/nan: step 2's loss is not finite
    args = pretrain_overrides(
        labelled[0], run, "max_steps=3", "checkpoint_every=1", "data.std=[0,0,0]", "resume_accept=[data.std]"
    )
    line = assert_user_error(
        clasp_in_process("pretrain", *args), "non-finite loss at step 2", "nothing after it was saved"
    )
    for term in ("total=", "dino=", "part=", "attribute="):
        assert term in line, (term, line)
    assert f"Last good checkpoint: {run / 'checkpoints' / 'step-000000001.pt'}" in line
    assert [p.name for p in list_checkpoints(run)] == ["step-000000001.pt"]  # nothing written after the failure
    assert [json.loads(r)["step"] for r in (run / "log.jsonl").read_text().splitlines()] == [1]

    # with the cause fixed, the same command resumes from the named checkpoint
    summary = train(pretrain_config(labelled[0], run, "max_steps=3", "checkpoint_every=1"))
    assert summary.step == 3
    assert [json.loads(r)["step"] for r in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_ingest_refuses_a_disk_too_small_before_writing(world: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    done = clasp(
        "ingest", "--source", str(world / "luperson"), "--corpus", CORPUS, "--root", str(root),
        env={DISK_LIMIT_ENV: "20000"},
    )  # fmt: skip
    assert_user_error(done, "not enough disk space for image shards of 'rel'", "needs about", "free")
    assert not root.exists()  # no shard, plan or manifest: the command removes the folder it made (issue 18)


def test_ingest_estimate_lets_a_large_enough_disk_through(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source_bytes = sum(p.stat().st_size for p in (world / "luperson").rglob("*.jpg"))
    monkeypatch.setenv(DISK_LIMIT_ENV, str(2 * source_bytes + 100_000))  # what it writes, with room to spare
    cfg = IngestConfig(source=str(world / "luperson"), corpus=CORPUS, root=str(tmp_path), images_per_shard=PER_SHARD,
                       workers=1, quiet=True)  # fmt: skip
    assert ingest(cfg).images == 32
    written = sum(p.stat().st_size for p in images_dir(tmp_path, CORPUS).glob("*.tar"))
    assert written <= 2 * source_bytes + 100_000


def test_labeling_refuses_a_disk_too_small_before_writing(
    labelled: tuple[Path, str], clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(images_dir(labelled[0], CORPUS), images_dir(tmp_path, CORPUS))
    monkeypatch.setenv(DISK_LIMIT_ENV, "4000")  # 32 images x 256 bytes do not fit
    with pytest.raises(ClaspError, match=r"not enough disk space for label shards in .*needs about 8\.8 KB"):
        label_stage.run_labeling(label_config(tmp_path, clip_dir))
    assert not (tmp_path / CORPUS / "labels").exists()


def test_pretraining_refuses_a_disk_too_small_before_writing(
    labelled: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DISK_LIMIT_ENV, "100000")  # one tiny-model checkpoint is a few MB
    out = tmp_path / "run"
    line = assert_user_error(clasp_in_process("pretrain", *pretrain_overrides(labelled[0], out, "max_steps=2")))
    assert "not enough disk space for pre-training checkpoints" in line and str(out) in line
    assert not out.exists()


def test_export_refuses_a_disk_too_small_before_writing(
    one_step_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = list_checkpoints(one_step_run)[-1]
    monkeypatch.setenv(DISK_LIMIT_ENV, "10000")
    with pytest.raises(ClaspError, match="not enough disk space for the backbone export release"):
        export_backbone(checkpoint, tmp_path / "release", card={})
    assert files_under(tmp_path) == []
