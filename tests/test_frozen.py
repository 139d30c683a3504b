"""Frozen-feature read-outs (transfer/frozen.py): retrieval mAP and the closed-form attribute read-out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.transfer_data import write_market, write_pa100k

from pipeline.config import load_config
from pipeline.errors import ClaspError
from transfer.frozen import CONFIG, balanced_ridge, pixel_size, run


def _run(data: Path, dataset: str, spec: str, out: Path) -> dict:
    overrides = [f"data_dir={data}", f"dataset={dataset}", f"backbone.spec={spec}", f"out_dir={out}", "workers=0",
                 "quiet=true", "img_size=[32,16]"]  # fmt: skip
    return run(load_config(CONFIG, None, overrides))


def test_pixels_retrieve_colour_coded_identities_and_a_random_vit_does_not_break(tmp_path: Path) -> None:
    # every identity of the tiny Market layout has its own colour: raw pixels find all matches first
    market = write_market(tmp_path / "market")
    pixels = _run(market, "market1501", "pixels:4x2", tmp_path / "px")
    assert pixels["mAP"] == pytest.approx(1.0) and pixels["metrics"]["rank1"] == pytest.approx(1.0)
    assert "Market-1501 protocol" in pixels["protocol"] and pixels["backbone"] == "raw pixels 4x2"
    vit = _run(market, "market1501", "random:vit_micro", tmp_path / "vit")
    assert 0.0 < vit["mAP"] <= 1.0
    again = _run(market, "market1501", "pixels:4x2", tmp_path / "px")  # a finished run is reused
    assert again["created_utc"] == pixels["created_utc"]


def test_ridge_readout_reads_attributes_from_pixels(tmp_path: Path) -> None:
    # attributes 0-2 are the red/green/blue channel of the image; attribute 3 has no positives (half of mA 0)
    pa100k = write_pa100k(tmp_path / "pa100k", sizes=(40, 12, 16))
    result = _run(pa100k, "pa100k", "pixels:4x2", tmp_path / "out")
    assert result["mA"] > 0.85 * 3 / 4 + 0.5 / 4 - 1e-6
    assert "ridge" in result["protocol"] and str(result["ridge_strength"]) in result["val_mA"]


def test_balanced_ridge_scores_an_uninformative_feature_at_one_half() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((400, 1)) < 0.1).astype(np.uint8)  # 10% positives
    noise = rng.normal(size=(400, 3))
    weights = balanced_ridge(noise, labels, 1e6)  # all weight on the (unpenalised) bias
    assert weights[-1, 0] == pytest.approx(0.5, abs=1e-3)  # plain least squares would give the prior, 0.1
    informative = np.concatenate([noise, labels.astype(float)], axis=1)
    scores = np.c_[informative, np.ones(400)] @ balanced_ridge(informative, labels, 1e-3)
    assert ((scores[:, 0] > 0.5) == (labels[:, 0] == 1)).all()


def test_bad_specs_and_datasets_are_named(tmp_path: Path) -> None:
    assert pixel_size("pixels:16x8") == (16, 8) and pixel_size("random:vit_micro") is None
    with pytest.raises(ClaspError, match="pixels:HxW"):
        pixel_size("pixels:16")
    with pytest.raises(ClaspError, match="unknown dataset 'coco'"):
        _run(tmp_path, "coco", "pixels:4x2", tmp_path / "o")


def test_feature_backbone_reports_the_token_stride_of_a_conv_stem() -> None:
    # dense heads size their maps from it: the conv stem's 4 px and the projection's 4 px make 16
    from transfer.backbone import BackboneConfig, build_backbone

    for spec in ("random:vit_micro_conv", "random:vit_micro"):
        assert build_backbone(BackboneConfig(spec=spec), (128, 64)).patch_size == 16
