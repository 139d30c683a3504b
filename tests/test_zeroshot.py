"""``clasp zeroshot``: the labels' CLIP text tower, the labeler's scoring rule, the PA-100K protocol, refusals."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.labels import TINY_CLIP, write_clip_dir
from helpers.model import NUM_ATTRS, NUM_PARTS, checkpoint_dict, distill_cfg

from labeling.clip_model import DenseClip, file_sha256, load_clip
from labeling.image_shards import decode_image
from labeling.labelers import Labeler, build_labeler, exclusive_groups
from pipeline.errors import ClaspError
from pipeline.vocab import load_attributes, load_parts
from pretrain.export import export_backbone
from pretrain.meta_arch import ClaspMetaArch
from transfer.attributes.datasets import load_attr_dataset
from transfer.attributes.metrics import attribute_metrics
from transfer.zeroshot import TextTower, ZeroShotConfig, run_zeroshot

CLIP_RES = (64, 32)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_dir(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory, clip_dir: Path) -> Path:
    """A distilled export whose checkpoint names the tiny CLIP as the labels' CLIP."""
    tmp = tmp_path_factory.mktemp("release")
    torch.manual_seed(0)
    cfg = distill_cfg()
    model = ClaspMetaArch(cfg, num_parts=NUM_PARTS, num_attributes=NUM_ATTRS, clip_embed_dim=TINY_CLIP["embed_dim"])
    weights = clip_dir / "open_clip_pytorch_model.bin"
    clip = {"arch": "test-tiny", "weights": str(weights), "weights_id": file_sha256(weights), "random": True,
            "logit_scale": 14.3, "resolution": list(CLIP_RES)}  # fmt: skip
    torch.save(checkpoint_dict(model, cfg, step=1) | {"data": {"clip": clip}}, tmp / "ck.pt")
    return export_backbone(tmp / "ck.pt", tmp / "release", card={})


def test_text_tower_scores_attributes_as_the_labeler_does() -> None:
    vocab = load_attributes()
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(26, 8, generator=g), torch.randn(26, 8, generator=g)
    pos, neg = pos / pos.norm(dim=1, keepdim=True), neg / neg.norm(dim=1, keepdim=True)
    image = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    groups = exclusive_groups(vocab)
    tower = TextTower(vocab.names, pos, neg, 20.0, groups)
    labeler = Labeler(attr_pos=pos, attr_neg=neg, part_text=pos[:3], person_text=pos[0], background_text=neg[0],
                      logit_scale=20.0, groups=groups, label_grid=(2, 1))  # fmt: skip
    assert torch.allclose(tower.probabilities(3.0 * image), labeler.attributes(image))  # any norm: cosine


def test_pa100k_layout_gives_backbone_and_clip_mA_with_the_attribute_protocol(
    release: Path, clip_dir: Path, synth_world: Path, tmp_path: Path
) -> None:
    cfg = ZeroShotConfig(backbone=str(release), data=str(synth_world / "pa100k"), out=str(tmp_path / "zs"),
                         device="cpu", quiet=True, batch_size=16)  # fmt: skip
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        record = run_zeroshot(cfg)
    assert set(record["results"]) == {"backbone", "clip"} and len(record["attributes"]) == 26
    assert (tmp_path / "zs" / "results.md").read_text().count("| ") >= 12
    # the CLIP row is exactly the labeler's attribute probabilities on the same images, scored by the trained
    # attributes task's metric
    data = load_attr_dataset("pa100k", synth_world / "pa100k")
    paths, labels = data.split("test")
    loaded = load_clip("test-tiny", clip_dir, allow_random_weights=True)
    labeler = build_labeler(loaded, load_attributes(), load_parts(), label_grid=(2, 1))
    labeler.logit_scale = 14.3
    mean, std = torch.tensor(loaded.mean).view(1, 3, 1, 1) * 255, torch.tensor(loaded.std).view(1, 3, 1, 1) * 255
    images = torch.stack([decode_image(Path(p).read_bytes(), CLIP_RES) for p in paths]).float()
    with torch.no_grad():
        emb, _ = DenseClip(loaded.model, CLIP_RES)((images - mean) / std)
    expected = attribute_metrics(labels, labeler.attributes(emb).numpy())
    assert record["results"]["clip"]["mA"] == pytest.approx(100 * expected["mA"], abs=0.01)
    assert 0 <= record["results"]["backbone"]["mA"] <= 100
    assert record["results"]["clip"]["agreement_with_clip"] == 100 and record["results"]["clip"]["cosine_to_clip"] == 1
    assert -1 <= record["results"]["backbone"]["cosine_to_clip"] <= 1


def test_another_clip_than_the_labels_one_is_refused(release: Path, synth_world: Path, tmp_path: Path) -> None:
    other = write_clip_dir(tmp_path / "other", seed=1)
    cfg = ZeroShotConfig(backbone=str(release), data=str(synth_world / "pa100k"), out=str(tmp_path / "zs"),
                         clip_checkpoint=str(other), device="cpu", quiet=True)  # fmt: skip
    with pytest.warns(UserWarning), pytest.raises(ClaspError, match="weights id .* the CLIP that made the labels"):
        run_zeroshot(cfg)


def test_images_folder_gets_one_row_of_scores_per_image(release: Path, synth_world: Path, tmp_path: Path) -> None:
    folder = synth_world / "pa100k"
    cfg = ZeroShotConfig(backbone=str(release), images=str(folder), out=str(tmp_path / "zs"), device="cpu", quiet=True)
    with pytest.warns(UserWarning):
        record = run_zeroshot(cfg)
    with open(tmp_path / "zs" / "scores.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][1:] == load_attributes().names and len(rows) - 1 == record["images"] > 0
    assert all(0.0 <= float(v) <= 1.0 for v in np.array(rows[1:])[:, 1:].ravel())


def test_post_hoc_linear_maps_read_the_distilled_and_a_plain_reference_backbone(
    release: Path, clip_dir: Path, synth_world: Path, tmp_path: Path
) -> None:
    from helpers.labels import ingest_folder, noise_images
    from helpers.model import tiny_cfg

    from labeling.label import LabelConfig, run_labeling

    root = ingest_folder(noise_images(40, size=(128, 64)), tmp_path, "fit", per_shard=16)
    label_cfg = LabelConfig(root=str(root), corpus="fit", clip_checkpoint=str(clip_dir), allow_random_weights=True,
                            resolution=CLIP_RES, workers=0, quiet=True, with_embed=True)  # fmt: skip
    with pytest.warns(UserWarning):
        labelset = run_labeling(label_cfg).labelset
    plain_cfg = tiny_cfg(enabled=False)  # a plain ViT reference: read without a prompt
    torch.manual_seed(1)
    plain = ClaspMetaArch(plain_cfg, num_parts=NUM_PARTS, num_attributes=NUM_ATTRS)
    torch.save(checkpoint_dict(plain, plain_cfg, step=1), tmp_path / "plain.pt")
    reference = export_backbone(tmp_path / "plain.pt", tmp_path / "plain", card={})
    cfg = ZeroShotConfig(backbone=str(release), data=str(synth_world / "pa100k"), out=str(tmp_path / "zs"),
                         device="cpu", quiet=True, compare_clip=False, fit_root=str(root), fit_corpus="fit",
                         fit_images=30, reference_backbone=str(reference))  # fmt: skip
    with pytest.warns(UserWarning):
        record = run_zeroshot(cfg)
    assert list(record["results"]) == ["backbone", "backbone_posthoc", "reference_posthoc"]
    for fit in record["posthoc_fits"].values():
        assert fit["labelset"] == labelset and fit["images"] == 30 and -1 <= fit["train_cosine"] <= 1
    cfg.reference_backbone, cfg.fit_corpus = str(reference), None
    with pytest.raises(ClaspError, match="set fit_corpus"):
        run_zeroshot(cfg)
