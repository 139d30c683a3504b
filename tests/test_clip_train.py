"""`clasp clip-train`: a few steps on a handful of pairs give a checkpoint stock open_clip loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from labeling.clip_model import load_clip
from labeling.clip_train import ClipTrainConfig, PairImages, read_pairs, train_clip
from pipeline.cli import app
from pipeline.errors import ClaspError

ARCH = "clasp-vit-tiny-8"


def write_pairs(folder: Path, n: int = 16) -> Path:
    """Red-top or blue-top 'people' with captions saying which: a signal a few steps can start to learn."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = rng.integers(0, 60, (128, 64, 3), dtype=np.uint8)
        colour = ("red", (220, 30, 30)) if i % 2 else ("blue", (30, 30, 220))
        img[20:70, 16:48] = colour[1]
        Image.fromarray(img).save(folder / f"p{i}.jpg")
        rows.append((f"p{i}.jpg", f"a person wearing a {colour[0]} t-shirt"))
    with open(folder / "pairs.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return folder / "pairs.csv"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pairs = write_pairs(tmp_path_factory.mktemp("pairs"))
    out = tmp_path_factory.mktemp("clip")
    cfg = ClipTrainConfig(
        pairs=str(pairs),
        arch=ARCH,
        out=str(out),
        epochs=2,
        batch_size=8,
        warmup_steps=1,
        lr=5e-4,
        workers=0,
        quiet=True,
    )
    return pairs, train_clip(cfg)


def test_checkpoint_loads_with_stock_open_clip(trained: tuple[Path, Path]) -> None:
    _, weights = trained
    model = open_clip.create_model(ARCH, pretrained=str(weights))
    fresh = open_clip.create_model(ARCH)
    assert abs(float(model.logit_scale) - float(fresh.logit_scale)) > 1e-4, "training moved the temperature"
    again = open_clip.create_model(f"local-dir:{weights.parent}")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    cfg = json.loads((weights.parent / "open_clip_config.json").read_text())
    assert cfg["arch"] == ARCH and cfg["model_cfg"]["vision_cfg"]["image_size"] == [128, 64]
    log = json.loads((weights.parent / "train_log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [0, 1] and all(np.isfinite(e["loss"]) for e in log["epochs"])
    assert (weights.parent / "clip_train_config.yaml").is_file() and not (weights.parent / "train_state.pt").exists()


def test_trained_checkpoint_is_accepted_by_the_labeler(trained: tuple[Path, Path]) -> None:
    _, weights = trained
    loaded = load_clip(ARCH, weights.parent)  # no allow_random_weights: it is trained
    assert loaded.identity.random is False and len(loaded.identity.weights_id) == 16


def test_fine_tune_from_a_checkpoint_via_cli(trained: tuple[Path, Path], tmp_path: Path) -> None:
    pairs, weights = trained
    result = CliRunner().invoke(
        app,
        [
            "clip-train",
            "--pairs",
            str(pairs.parent),
            "--arch",
            ARCH,
            "--init",
            str(weights.parent),
            "--out",
            str(tmp_path / "ft"),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    tuned = open_clip.create_model(ARCH, pretrained=str(tmp_path / "ft" / "open_clip_model.safetensors"))
    start = open_clip.create_model(ARCH, pretrained=str(weights))
    diff = [not torch.equal(a, b) for a, b in zip(tuned.parameters(), start.parameters(), strict=True)]
    assert any(diff)


def test_bad_pairs_files_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text\nx.jpg,a person\n")
    with pytest.raises(ClaspError, match="missing column"):
        read_pairs(bad)
    bad.write_text("image,caption\nnope.jpg,a person\n")
    with pytest.raises(ClaspError, match="does not exist"):
        read_pairs(bad)


def test_box_column_crops_to_the_region(tmp_path: Path) -> None:
    """A `box` row trains on that region only: the crop of a half-red, half-blue image is all one colour."""
    img = np.zeros((100, 60, 3), dtype=np.uint8)
    img[:50] = (255, 0, 0)
    img[50:] = (0, 0, 255)
    Image.fromarray(img).save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text('image,caption,box\na.png,a person,\na.png,a red top,"0 0 60 50"\n')
    images, captions, boxes = read_pairs(tmp_path / "pairs.csv")
    assert captions == ["a person", "a red top"] and boxes == [None, (0, 0, 60, 50)]
    data = PairImages(images, (32, 16), ClipTrainConfig(hflip=False), boxes)
    whole, region = data[0][1].float(), data[1][1].float()
    assert whole[2].mean() > 60  # the whole image holds blue
    assert region[0].min() > 200 and region[2].max() < 40  # the region is red only


def test_bad_boxes_name_the_row(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((40, 20, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    pairs = tmp_path / "pairs.csv"
    for box in ("1 2 3", "5 5 2 9", "a b c d"):
        pairs.write_text(f'image,caption,box\na.png,a person,\na.png,a head,"{box}"\n')
        with pytest.raises(ClaspError, match="row 2: box"):
            read_pairs(pairs)
    pairs.write_text('image,caption,box\na.png,a head,"0 0 20 80"\n')
    images, _, boxes = read_pairs(pairs)
    with pytest.raises(ClaspError, match="outside the 20x40 image"):
        PairImages(images, (32, 16), ClipTrainConfig(), boxes)[0]


def test_rerun_reuses_a_finished_run_only_for_the_same_config_and_pairs(tmp_path: Path) -> None:
    pairs = write_pairs(tmp_path / "pairs", n=8)
    cfg = ClipTrainConfig(
        pairs=str(pairs), arch=ARCH, out=str(tmp_path / "clip"), epochs=1, batch_size=8, workers=0, quiet=True
    )
    weights = train_clip(cfg)
    stamp = weights.stat().st_mtime_ns
    assert train_clip(cfg) == weights and weights.stat().st_mtime_ns == stamp  # nothing retrained
    pairs.write_text(pairs.read_text().replace("t-shirt", "shirt"))  # edited captions: train again
    train_clip(cfg)
    assert weights.stat().st_mtime_ns != stamp
    stamp = weights.stat().st_mtime_ns
    cfg.epochs = 2  # another config: train again
    train_clip(cfg)
    assert weights.stat().st_mtime_ns != stamp
    log = json.loads((weights.parent / "train_log.json").read_text())
    assert len(log["epochs"]) == 2 and len(log["pairs_sha256"]) == 64
