"""Audit report and run-folder fixes of issue 18: mosaics show one image per video (LUPerson frames of a
video are near-duplicates), transfer folders carry no ':' in their names. The report itself:
tests/reliability/test_first_hour.py::test_audit_mosaics_rank_by_probability_one_image_per_video."""

from __future__ import annotations

from pathlib import Path

import pytest

from labeling.audit_metrics import one_per_video, video_of


def test_mosaic_candidates_take_one_frame_per_video_first() -> None:
    ranked = ["fr_paris_v1_0003", "fr_paris_v1_0007", "fr_paris_v1_0001", "ca_tor_v2_0001", "ca_tor_v2_0009"]
    assert video_of("fr_paris_v1_0003") == "fr_paris_v1"
    assert one_per_video(ranked, 2) == ["fr_paris_v1_0003", "ca_tor_v2_0001"]  # was the first two frames of v1
    assert one_per_video(ranked, 4) == ["fr_paris_v1_0003", "ca_tor_v2_0001", "fr_paris_v1_0007", "fr_paris_v1_0001"]


def test_transfer_folder_of_a_random_backbone_has_no_colon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import transfer.registry
    from pipeline import ablate
    from pipeline.ablate import AblationConfig, TransferRun
    from transfer.reid.train import ReidConfig

    seen = {}
    monkeypatch.setattr(
        transfer.registry, "task_entry", lambda task: (ReidConfig, lambda cfg: seen.update(out=cfg.out_dir))
    )
    ablate._transfer(AblationConfig(), TransferRun(task="reid"), "random:vit_micro", 0, tmp_path, tmp_path / "out")
    assert ":" not in Path(seen["out"]).name and Path(seen["out"]).name.startswith("random-vit_micro-")
