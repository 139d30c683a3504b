"""The ablation runner's own logic, with the stages replaced by recorders (the stages have their own tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import ablate
from pipeline.ablate import AblationConfig, TransferRun, Variant
from pipeline.errors import ClaspError


@pytest.fixture()
def recorded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    calls: dict = {"pretrain": [], "transfer": [], "gt": []}
    monkeypatch.setattr(ablate, "_prepare_corpus", lambda cfg, out, log: (tmp_path / "data", tmp_path / "world"))
    monkeypatch.setattr(ablate, "_label", lambda cfg, out, root, world, log: "clip-set")
    monkeypatch.setattr(ablate, "_audit", lambda *a: None)

    def gt_labelset(root, corpus, source, gt_path):  # noqa: ANN001, ANN202
        calls["gt"].append((source, Path(gt_path).name))
        return "gt-set"

    import labeling.oracle

    monkeypatch.setattr(labeling.oracle, "write_gt_labelset", gt_labelset)

    def pretrain(cfg, variant, seed, root, labelset, out):  # noqa: ANN001, ANN202
        calls["pretrain"].append((variant.name, seed, labelset))
        return tmp_path / "backbones" / f"{variant.name}-s{seed}"

    def transfer(cfg, run, backbone, seed, world, out):  # noqa: ANN001, ANN202
        calls["transfer"].append((run.task, Path(backbone).name, seed))
        score = {"random:vit_micro": 0.1, "dino-s0": 0.2, "dino-s1": 0.4, "gt-s0": 0.5, "gt-s1": 0.7}
        return {"metrics": {run.metric: score[Path(backbone).name] if run.task == "reid" else 0.5}}

    monkeypatch.setattr(ablate, "_pretrain", pretrain)
    monkeypatch.setattr(ablate, "_transfer", transfer)
    return calls


def test_table_routes_labels_and_averages_seeds(recorded: dict, tmp_path: Path) -> None:
    cfg = AblationConfig(
        out=str(tmp_path / "out"),
        variants=[Variant(name="random", pretrain=False), Variant(name="dino"), Variant(name="gt", labels="gt")],
        transfers=[
            TransferRun(task="reid", metric="mAP"),
            TransferRun(task="attributes", dataset="pa100k", metric="mA"),
        ],
        seeds=[0, 1],
    )
    results = ablate.run_ablation(cfg)
    assert recorded["gt"] == [("clip-set", "gt.parquet")]  # written once, from the CLIP set's shards
    assert sorted(recorded["pretrain"]) == [("dino", 0, "clip-set"), ("dino", 1, "clip-set"), ("gt", 0, "gt-set"),
                                            ("gt", 1, "gt-set")]  # fmt: skip
    assert len(recorded["transfer"]) == 3 * 2 * 2
    table = {row["variant"]: row for row in results["table"]}
    assert table["dino"]["market1501 mAP"] == {"mean": pytest.approx(0.3), "std": pytest.approx(0.1), "n": 2}
    assert table["gt"]["market1501 mAP"]["mean"] == pytest.approx(0.6)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| gt † | 60.0 ± 10.0 | 50.0 ± 0.0 |" in md and "ground-truth labels" in md
    assert json.loads((tmp_path / "out" / "results.json").read_text())["gt_labelset"] == "gt-set"
    assert (tmp_path / "out" / "results.png").stat().st_size > 0


def test_gt_labels_need_the_synthetic_world(recorded: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ablate, "_prepare_corpus", lambda cfg, out, log: (tmp_path / "data", None))
    cfg = AblationConfig(out=str(tmp_path / "out"), variants=[Variant(name="gt", labels="gt")])
    with pytest.raises(ClaspError, match="synthetic world"):
        ablate.run_ablation(cfg)


def test_shipped_ablation_configs_load() -> None:
    from pipeline.config import load_config

    for name in ("ablation_synthetic.yaml", "demo.yaml"):
        cfg = load_config(AblationConfig, ablate.REPO_DIR / "configs" / name)
        assert cfg.variants and cfg.transfers
