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

    def gt_labelset(root, corpus, source, gt_path, attr_flip=0.0, part_noise=0.0):  # noqa: ANN001, ANN202
        calls["gt"].append((source, Path(gt_path).name))
        return "gt-set" if attr_flip == part_noise == 0 else f"gt-noisy-{attr_flip}"

    import labeling.oracle

    monkeypatch.setattr(labeling.oracle, "write_gt_labelset", gt_labelset)

    def pretrain(cfg, variant, seed, root, labelset, out):  # noqa: ANN001, ANN202
        calls["pretrain"].append((variant.name, seed, labelset))
        return tmp_path / "backbones" / f"{variant.name}-s{seed}"

    def transfer(cfg, run, backbone, seed, world, out):  # noqa: ANN001, ANN202
        calls["transfer"].append((run.task, Path(backbone).name, seed))
        score = {"random:vit_micro": 0.1, "dino-s0": 0.2, "dino-s1": 0.4, "gt-s0": 0.5, "gt-s1": 0.7, "noisy-s0": 0.3,
                 "pixels:8x4": 0.15, "gt2-s0": 0.5, "gt2-s1": 0.7, "dino_only-s0": 0.2, "gt_labels-s0": 0.30,
                 "gt_labels-s1": 0.31, "gt_labels-s2": 0.32}  # fmt: skip
        return {"metrics": {run.metric: score[Path(backbone).name] if run.task in ("reid", "frozen") else 0.5}}

    quality = {"clip-set": 0.6, "gt-set": 1.0, "gt-noisy-0.2": 0.8}
    monkeypatch.setattr(
        ablate, "_label_quality", lambda out, root, corpus, s, world: {"attribute_mA": quality[s], "part_mIoU": 0.5}
    )
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


def test_floors_and_dose_response(recorded: dict, tmp_path: Path) -> None:
    cfg = AblationConfig(
        out=str(tmp_path / "out"),
        variants=[
            Variant(name="raw_pixels", pretrain=False, backbone="pixels:8x4"),
            Variant(name="dino"),
            Variant(name="gt", labels="gt"),
            Variant(name="noisy", labels="gt", attr_flip=0.2, part_noise=0.2),
            Variant(name="gt2", labels="gt", seeds=[0, 1]),
            Variant(name="dino_only", overrides=["model.loss.part=false", "model.loss.attribute=false"]),
        ],
        transfers=[TransferRun(task="reid", metric="mAP"), TransferRun(task="frozen", metric="mAP")],
        seeds=[0],
    )
    results = ablate.run_ablation(cfg)
    # raw pixels: frozen read-out only; every pre-trained variant gets both
    assert [c for c in recorded["transfer"] if c[1] == "pixels:8x4"] == [("frozen", "pixels:8x4", 0)]
    assert ("noisy", 0, "gt-noisy-0.2") in recorded["pretrain"]
    assert [(v, s) for v, s, _ in recorded["pretrain"] if v == "gt2"] == [("gt2", 0), ("gt2", 1)]  # its own seeds
    assert results["label_quality"] == {
        "dino": {"attribute_mA": 0.6, "part_mIoU": 0.5},
        "gt": {"attribute_mA": 1.0, "part_mIoU": 0.5},
        "noisy": {"attribute_mA": 0.8, "part_mIoU": 0.5},
        "gt2": {"attribute_mA": 1.0, "part_mIoU": 0.5},
    }  # dino_only reads no labels: no point on the label-quality axis
    table = {row["variant"]: row for row in results["table"]}
    assert "market1501 mAP" not in table["raw_pixels"] and table["raw_pixels"]["market1501 mAP frozen"]["mean"] == 0.15
    assert {r["task"] for r in results["rows"]} == {"reid", "frozen"}
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| raw_pixels | – | 15.0 | – | – |" in md and "| noisy † | 30.0 | 30.0 | 80.0 | 50.0 |" in md
    assert (tmp_path / "out" / "results.png").stat().st_size > 0


def test_the_runner_judges_its_positive_control(recorded: dict, tmp_path: Path) -> None:
    cfg = AblationConfig(
        out=str(tmp_path / "out"),
        variants=[
            Variant(name="raw_pixels", pretrain=False, backbone="pixels:8x4"),
            Variant(name="random_init", pretrain=False),
            Variant(name="gt_labels", labels="gt"),
        ],
        transfers=[TransferRun(task="frozen", metric="mAP"), TransferRun(task="frozen", dataset="x", metric="mA")],
        seeds=[0, 1, 2],
        control_margins={"mAP": 0.1, "mA": 0.3},
    )
    results = ablate.run_ablation(cfg)
    verdicts = {c["column"]: c for c in results["checks"]["positive_control"]}
    assert verdicts["market1501 mAP frozen"]["passed"]  # 31 vs 10 (random) and 15 (pixels), 3 seeds
    assert verdicts["market1501 mAP frozen"]["gain"] == pytest.approx(0.21)
    assert not verdicts["x mA frozen"]["passed"] and "< 30.0 points" in verdicts["x mA frozen"]["reason"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Positive control on market1501 mAP frozen: PASSES" in md and "x mA frozen: FAILS" in md
