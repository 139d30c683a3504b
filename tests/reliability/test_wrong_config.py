"""Wrong settings through the real ``clasp`` console script: exit status 2, one line naming the problem, no traceback.

Each case is a fresh process, as a user would type it; most stop before any model is built.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.reliability import CORPUS, assert_user_error, clasp, clasp_all, pretrain_overrides

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def test_unknown_key_names_the_closest_valid_one(tmp_path: Path) -> None:
    done = clasp("ingest", "--source", str(tmp_path), "--corpus", "x", "seeed=1")
    assert_user_error(done, "unknown config key 'seeed'", "did you mean 'seed'")


def test_unknown_key_in_a_config_file_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "ingest.yaml"
    config.write_text("images_per_shard: 8\nworkerz: 2\n")
    done = clasp("ingest", "--config", str(config), "--source", str(tmp_path), "--corpus", "x")
    assert_user_error(done, str(config), "unknown config key 'workerz'", "did you mean 'workers'")


def test_wrong_type_names_the_key_and_the_type(tmp_path: Path) -> None:
    done = clasp("ingest", "--source", str(tmp_path), "--corpus", "x", "images_per_shard=lots")
    assert_user_error(done, "images_per_shard", "expected an integer", "'lots'")


def test_missing_config_file() -> None:
    assert_user_error(
        clasp("ingest", "--config", "configs/no_such.yaml"), "config file configs/no_such.yaml does not exist"
    )


def test_missing_dataset_paths(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    ingest_run, pretrain_run, label_run, transfer_run = clasp_all(
        ["ingest", "--source", str(missing), "--corpus", "x"],
        ["pretrain", f"data.root={missing}", f"out={tmp_path / 'run'}"],
        ["label", "--root", str(missing), "--corpus", CORPUS, "--device", "cpu"],
        ["transfer", "reid", "--data", str(missing), "--dataset", "market1501", "--backbone", "random:vit_micro",
         "--out", str(tmp_path / "reid")],
    )  # fmt: skip
    assert_user_error(ingest_run, str(missing), "does not exist")
    assert_user_error(pretrain_run, f"data.root={missing}", "does not exist", "run `clasp ingest`")
    assert_user_error(label_run, str(missing / CORPUS / "images" / "sizes.json"), "run `clasp ingest`")
    assert_user_error(transfer_run, str(missing), "does not exist", "--data")


@NO_GPU
def test_gpu_requested_where_none_exists(world: Path, labelled: tuple[Path, str], tmp_path: Path) -> None:
    root, _ = labelled
    label_run, pretrain_run, clip_run, transfer_run = clasp_all(
        ["label", "--root", str(root), "--corpus", CORPUS, "--device", "cuda"],
        ["pretrain", *pretrain_overrides(root, tmp_path / "run", "mixed_precision=fp16")],
        ["clip-train", "--pairs", str(world / "pairs.csv"), "--out", str(tmp_path / "clip"), "--device", "cuda:0"],
        ["transfer", "reid", "--data", str(world / "market1501"), "--dataset", "market1501", "--backbone",
         "random:vit_micro", "--out", str(tmp_path / "reid"), "device=cuda"],
    )  # fmt: skip
    for done in (label_run, transfer_run):
        assert_user_error(done, "device 'cuda'", "no CUDA GPU", "device=cpu")
    assert_user_error(clip_run, "device 'cuda:0'", "no CUDA GPU")
    assert_user_error(pretrain_run, "mixed_precision=fp16 needs a CUDA GPU", "bf16")
    assert not any((tmp_path / name).exists() for name in ("run", "reid"))  # clip-train makes its (empty) folder first


def test_batch_larger_than_the_data(labelled: tuple[Path, str], tmp_path: Path) -> None:
    done = clasp("pretrain", *pretrain_overrides(labelled[0], tmp_path / "run", "data.batch_size=40"))
    assert_user_error(done, "global batch 40", f"corpus '{CORPUS}' (32 images)", "lower data.batch_size")
    assert not (tmp_path / "run").exists()
