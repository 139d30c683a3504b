"""Human parsing: the synthetic LIP writer and reader (real layout), flip with left/right class swap, logits
mapped back to each label's own resolution, the segmentation head, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.errors import ClaspError
from pipeline.synth.lip import write_lip
from transfer.parsing.datasets import (
    ParsingAugment,
    ParsingDataset,
    box_affine,
    flip_label,
    load_parsing_dataset,
    logits_to_original,
    read_label,
    warp,
)
from transfer.parsing.metrics import LIP_CLASSES, confusion_matrix
from transfer.parsing.model import ParsingModel, default_levels
from transfer.parsing.train import ParsingConfig, predict_logits, run, summarize

TINY_VIT = ["backbone.spec=random:vit_micro", "backbone.timm_kwargs={depth: 2}", "backbone.drop_path_rate=0.0"]


@pytest.fixture(scope="module")
def lip_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lip") / "LIP"
    return write_lip(out, seed=3, train_images=10, val_images=4, cameras=3, heights=(48, 96), scene_p=0.4)


# --- writer + reader ------------------------------------------------------------------------------


def test_writer_layout_is_read_by_the_lip_reader(lip_root: Path) -> None:
    data = load_parsing_dataset("lip", lip_root)
    assert data.layout.startswith("LIP TrainVal_images/")
    assert data.summary() == {"classes": 20, "train_images": 10, "val_images": 4}
    assert (lip_root / "train_id.txt").read_text().split() == [it.image_id for it in data.split("train")]
    sizes, seen = set(), set()
    for split, image_dir, label_dir in (("train", "train_images", "train_segmentations"),
                                        ("val", "val_images", "val_segmentations")):  # fmt: skip
        for item in data.split(split):
            assert item.image == str(lip_root / "TrainVal_images" / image_dir / f"{item.image_id}.jpg")
            assert item.label == str(lip_root / "TrainVal_parsing_annotations" / label_dir / f"{item.image_id}.png")
            with Image.open(item.label) as png, Image.open(item.image) as jpg:
                assert png.mode == "L" and jpg.format == "JPEG" and png.size == jpg.size
                sizes.add(jpg.size)
            label = read_label(item.label)
            assert label.max() < 20 and (label == 0).any() and (label > 0).any()
            seen |= set(np.unique(label).tolist())
    assert len(sizes) > 5  # crops vary in size and aspect
    assert {0, 2, 5, 13, 14, 15, 16, 17}.issubset(seen) and not {3, 6, 8, 10, 11} & seen  # never drawn
    summary = json.loads((lip_root / "lip_synth.json").read_text())
    assert summary["counts"] == {"train": 10, "val": 4} and summary["sources"]["scene"] > 0
    # a finished folder with the same arguments is reused; other arguments need overwrite
    before = (lip_root / "val_id.txt").stat().st_mtime_ns
    write_lip(lip_root, seed=3, train_images=10, val_images=4, cameras=3, heights=(48, 96), scene_p=0.4)
    assert (lip_root / "val_id.txt").stat().st_mtime_ns == before
    with pytest.raises(ClaspError, match="overwrite"):
        write_lip(lip_root, seed=4, train_images=10, val_images=4)
    assert not list(lip_root.parent.glob("*.tmp-*"))


def test_reader_names_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ClaspError, match="train_id.txt not found: --data must be the LIP root"):
        load_parsing_dataset("lip", tmp_path)
    (tmp_path / "train_id.txt").write_text("77_471474\n")
    with pytest.raises(ClaspError, match=r"train_images/77_471474.jpg \(listed in .*train_id.txt\) does not exist"):
        load_parsing_dataset("lip", tmp_path)
    # CE2P/SCHP's flat layout
    for folder, name in (("train_images", "77_471474.jpg"), ("train_segmentations", "77_471474.png"),
                         ("val_images", "5_1.jpg"), ("val_segmentations", "5_1.png")):  # fmt: skip
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((8, 4), np.uint8)).save(tmp_path / folder / name)
    (tmp_path / "val_id.txt").write_text("5_1\n")
    data = load_parsing_dataset("lip", tmp_path)
    assert data.split("val")[0].label == str(tmp_path / "val_segmentations" / "5_1.png")
    assert data.layout.startswith("LIP flat")
    with pytest.raises(ClaspError, match="unknown parsing dataset"):
        load_parsing_dataset("cityscapes", tmp_path)


# --- flip ------------------------------------------------------------------------------------------


def test_flip_mirrors_and_swaps_left_right_classes_exactly() -> None:
    label = np.array([[0, 14, 15, 2], [16, 17, 18, 19], [255, 5, 9, 13]], np.uint8)
    expected = np.array([[2, 14, 15, 0], [18, 19, 16, 17], [13, 9, 5, 255]], np.uint8)
    np.testing.assert_array_equal(flip_label(label), expected)
    np.testing.assert_array_equal(flip_label(flip_label(label)), label)


def test_training_sample_geometry_and_flip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 20, (32, 16)).astype(np.uint8)
    image = rng.integers(0, 255, (32, 16, 3)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(label).save(tmp_path / "a_label.png")
    from transfer.parsing.datasets import ParsingItem

    items = [ParsingItem("a", str(tmp_path / "a.png"), str(tmp_path / "a_label.png"))]
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    fixed = ParsingAugment(scale_factor=0.0, rotation_p=0.0, flip_prob=0.0)
    pixels, target, _ = ParsingDataset(items, (32, 16), mean, std, fixed)[0]
    np.testing.assert_array_equal(target.numpy(), label)  # image size = input size: identity
    np.testing.assert_allclose(pixels.permute(1, 2, 0).numpy(), (image / 255.0 - 0.5) / 0.25, atol=1e-5)
    flipped = ParsingAugment(scale_factor=0.0, rotation_p=0.0, flip_prob=1.0)
    pixels, target, _ = ParsingDataset(items, (32, 16), mean, std, flipped)[0]
    np.testing.assert_array_equal(target.numpy(), flip_label(label))
    np.testing.assert_allclose(pixels.permute(1, 2, 0).numpy(), (image[:, ::-1] / 255.0 - 0.5) / 0.25, atol=1e-5)
    # letterbox into a wider input: the sides are ignored (255), the image keeps its aspect
    pixels, target, _ = ParsingDataset(items, (32, 32), mean, std, fixed)[0]
    np.testing.assert_array_equal(target[:, 8:24].numpy(), label)
    assert (target[:, :8] == 255).all() and (target[:, 24:] == 255).all()
    # random augmentation keeps labels valid
    _, target, _ = ParsingDataset(items, (48, 48), mean, std, ParsingAugment(rotation_p=1.0), seed=1)[0]
    assert set(np.unique(target.numpy())) <= set(range(20)) | {255} and (target == 255).any()


def test_flip_test_swaps_channels_back() -> None:
    """An ideal model predicts the mirrored, left/right-swapped parsing of a mirrored image; flip test must
    then return exactly the original parsing (a missing swap or un-mirror would break left/right pixels)."""
    label = torch.tensor([[14, 15, 0, 16], [17, 18, 19, 5]])
    image = torch.randn(1, 3, 2, 4)
    plain = torch.nn.functional.one_hot(label, 20).permute(2, 0, 1)[None].float()
    mirrored = torch.nn.functional.one_hot(torch.from_numpy(flip_label(label.numpy().astype(np.uint8))).long(), 20)
    mirrored = mirrored.permute(2, 0, 1)[None].float()

    def ideal(x: torch.Tensor) -> torch.Tensor:
        return plain if torch.equal(x, image) else mirrored

    out = predict_logits(ideal, image, flip=True)  # type: ignore[arg-type]
    torch.testing.assert_close(out, plain)


# --- back to the original resolution ---------------------------------------------------------------


def test_prediction_mapped_back_to_original_size_scores_one() -> None:
    rng = np.random.default_rng(1)
    gt = np.kron(rng.integers(0, 8, (10, 5)), np.ones((4, 4), np.int64)).astype(np.uint8)  # 40x20, classes 0..7
    gt[0, 0] = 255
    input_size = (80, 80)
    matrix = box_affine(40, 20, input_size)  # scale 2, centred: columns 20..59 hold the image
    on_input = np.asarray(warp(Image.fromarray(gt), matrix, input_size, label=True, fill=255))
    assert (on_input[:, :20] == 255).all() and (on_input[:, 60:] == 255).all()
    logits = torch.nn.functional.one_hot(torch.from_numpy(on_input.astype(np.int64)).clamp(max=19), 20)
    logits = logits.permute(2, 0, 1).float()
    pred = logits_to_original(logits, matrix, 40, 20).argmax(0).numpy()
    assert pred.shape == gt.shape
    np.testing.assert_array_equal(pred[gt != 255], gt[gt != 255])
    metrics = summarize(confusion_matrix(gt, pred, 20), LIP_CLASSES)
    present = len(set(np.unique(gt).tolist()) - {255})
    assert metrics["mIoU_present_classes"] == 1.0 and metrics["pixel_acc"] == 1.0
    assert metrics["present_classes"] == present and metrics["mIoU"] == pytest.approx(present / 20)
    shifted = logits_to_original(torch.roll(logits, 2, dims=2), matrix, 40, 20).argmax(0).numpy()
    assert summarize(confusion_matrix(gt, shifted, 20), LIP_CLASSES)["mIoU_present_classes"] < 1.0


# --- model and end to end --------------------------------------------------------------------------


def test_head_levels_and_output_size() -> None:
    assert default_levels(12) == [2, 5, 8, 11] and default_levels(4) == [0, 1, 2, 3] and default_levels(2) == [0, 1]
    from transfer.backbone import BackboneConfig, build_backbone

    torch.manual_seed(0)  # the weights too: the learning check below must not depend on what ran before
    backbone = build_backbone(BackboneConfig(spec="random:vit_micro", timm_kwargs={"depth": 2}), (48, 64))
    model = ParsingModel(backbone, 20, levels=[], dim=16)
    assert model.levels == [0, 1]
    assert model(torch.randn(2, 3, 40, 56)).shape == (2, 20, 40, 56)  # padded to 48x64 inside, cropped back
    with pytest.raises(ClaspError, match="head.levels"):
        ParsingModel(backbone, 20, levels=[5], dim=16)
    # it learns: cross-entropy on one fixed batch goes down
    torch.manual_seed(0)
    images, labels = torch.randn(2, 3, 48, 64), torch.zeros(2, 48, 64, dtype=torch.long)
    labels[:, 16:, :32], labels[:, 16:, 32:], labels[1, 32:] = 5, 14, 9  # blocks the head can fit
    labels[:, :4] = 255
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(images), labels, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_parsing_end_to_end_writes_results(lip_root: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "run"
    overrides = [f"data_dir={lip_root}", f"out_dir={out}", "quiet=true", *TINY_VIT, "data.input_size=[64, 48]",
                 "data.batch_size=4", "data.workers=0", "head.dim=16", "epochs=2", "optim.lr=1e-3",
                 "optim.warmup_epochs=0"]  # fmt: skip
    cfg = load_config(ParsingConfig, overrides=overrides)
    record = run(cfg)
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"] == record["metrics"] and saved["task"] == "parsing"
    assert set(saved["metrics"]) == {"mIoU", "mIoU_present_classes", "pixel_acc", "mean_acc"}
    assert 0.0 <= saved["metrics"]["mIoU"] <= saved["metrics"]["mIoU_present_classes"] <= 1.0
    assert saved["classes_absent_from_ground_truth"] and "Glove" in saved["classes_absent_from_ground_truth"]
    assert saved["training"]["steps"] == 4 and len(saved["history"]) == 2
    # scored at each label's own resolution: the confusion matrix counts every val label pixel once
    val_pixels = sum(read_label(it.label).size for it in load_parsing_dataset("lip", lip_root).split("val"))
    assert int(np.asarray(saved["confusion_matrix"]).sum()) == val_pixels
    markdown = (out / "results.md").read_text()
    assert "CE2P/SCHP" in markdown and "| IoU Right-shoe |" in markdown and "(absent from ground truth)" in markdown
    assert (out / "model.safetensors").is_file() and not (out / "checkpoint.pt").exists()
    assert run(cfg)["created_utc"] == saved["created_utc"]  # finished: not run again
