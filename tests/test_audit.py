"""`clasp audit`: planted faults are found and reported, ground-truth metrics match numpy, --sql works.

The corpus is built by helpers/audit_corpus.py without the labeler: labels are ground truth with known
noise, and faults are planted into chosen shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.audit_corpus import ATTRS, CORPUS, GRID, PARTS, PER_SHARD, build_corpus, label_table

from labeling.audit import AuditConfig, run_audit, run_sql
from pipeline.formats import (
    label_shard_path,
    labels_dir,
    shard_stem,
)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("audit_root")
    data = build_corpus(root)
    cfg = AuditConfig(root=str(root), corpus=CORPUS, gt=str(root / "gt.parquet"), out=str(root / "audit"), quiet=True)
    report = run_audit(cfg)
    return report, data, json.loads((report.parent / "summary.json").read_text())


def _finding(summary: dict, text: str) -> dict:
    hits = [f for f in summary["findings"] if text in f["what"]]
    assert hits, f"no finding containing {text!r}: {[f['what'] for f in summary['findings']]}"
    return hits[0]


def test_planted_faults_are_reported(faulty: tuple[Path, dict, dict]) -> None:
    report, _, summary = faulty
    missing = _finding(summary, "missing label shard")
    assert missing["severity"] == "error" and missing["where"] == shard_stem(CORPUS, 2)
    misordered = _finding(summary, "order differs from the image shard")
    assert shard_stem(CORPUS, 1) in misordered["where"]
    assert misordered["count"] >= PER_SHARD - 2  # a permutation may leave a row or two in place
    flipped = _finding(summary, "anatomically implausible (>")
    assert (
        flipped["severity"] == "error" and flipped["where"].startswith(shard_stem(CORPUS, 3)) and flipped["count"] == 1
    )
    dup = _finding(summary, "duplicate keys")
    assert dup["count"] == 1
    lost = _finding(summary, "image keys with no label row")
    assert lost["count"] == 1 and shard_stem(CORPUS, 4) in lost["where"]
    # errors come first, and nothing is reported about the clean shards
    severities = [f["severity"] for f in summary["findings"]]
    assert severities == sorted(severities, key=["error", "warning", "info"].index)
    stale = _finding(summary, "area_<part> columns disagree")
    assert stale["count"] == 1 and stale["where"].startswith(shard_stem(CORPUS, 5))
    assert not any(shard_stem(CORPUS, 0) in f["where"] for f in summary["findings"] if f["severity"] == "error")
    # the report shows the findings at the top and embeds plots and image tiles
    page = report.read_text()
    assert page.index("Findings") < page.index("Attributes")
    assert "missing label shard" in page and "data:image/png;base64" in page and "data:image/jpeg;base64" in page
    assert all(f"{p}</span>" in page for p in PARTS[1:])  # legend
    queries = report.parent / "queries"
    shards = pq.read_table(queries / "shard_counts.parquet").to_pylist()
    assert {r["shard"]: r["status"] for r in shards}[shard_stem(CORPUS, 2)] == "missing label shard"
    assert (queries / "part_order_by_shard.csv").is_file() and (queries / "attribute_rates.sql").is_file()


def test_clean_corpus_has_no_errors(tmp_path: Path) -> None:
    build_corpus(tmp_path, n_shards=3, faults=False)
    cfg = AuditConfig(root=str(tmp_path), corpus=CORPUS, out=str(tmp_path / "audit"), mosaics=False, quiet=True)
    summary = json.loads((run_audit(cfg).parent / "summary.json").read_text())
    assert [f for f in summary["findings"] if f["severity"] == "error"] == []
    assert summary["rows"] == 3 * PER_SHARD


def test_ground_truth_metrics_match_numpy(faulty: tuple[Path, dict, dict]) -> None:
    _, d, summary = faulty
    m = summary["metrics"]
    assert m["gt_images"] == len(d["keys"]) == 5 * PER_SHARD
    # label-based mA: mean over attributes of (TP/P + TN/N) / 2, prediction = prob > 0.5
    pos, pred = d["gt_attr"] == 1, d["prob"].astype(float) / 255 > 0.5
    tpr = (pos & pred).sum(0) / np.maximum(pos.sum(0), 1e-20)
    tnr = (~pos & ~pred).sum(0) / np.maximum((~pos).sum(0), 1e-20)
    assert m["attribute_mA"] == pytest.approx(((tpr + tnr) / 2).mean(), abs=1e-9)
    # part mIoU over classes present in GT or prediction, confusion accumulated over all cells
    k = len(PARTS)
    g, p = d["gt_grid"].reshape(-1), d["pred_grid"].reshape(-1)
    conf = np.zeros((k, k))
    np.add.at(conf, (g, p), 1)
    inter, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    assert m["part_mIoU"] == pytest.approx((inter[union > 0] / union[union > 0]).mean(), abs=1e-9)
    fg_i, fg_u = ((g > 0) & (p > 0)).sum(), ((g > 0) | (p > 0)).sum()
    assert m["foreground_IoU"] == pytest.approx(fg_i / fg_u, abs=1e-9)
    # the flipped shard makes the labels much worse than clean ones would be, but they beat no information
    assert 0.2 < m["part_mIoU"] < 0.95


def test_sql_through_the_cli(faulty: tuple[Path, dict, dict]) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    report, _, _ = faulty
    root = report.parent.parent
    query = "SELECT shard, count(*) AS n FROM labels GROUP BY shard ORDER BY shard"
    res = CliRunner().invoke(app, ["audit", "--corpus", CORPUS, "--root", str(root), "--sql", query])
    assert res.exit_code == 0, res.output
    assert shard_stem(CORPUS, 0) in res.output and shard_stem(CORPUS, 2) not in res.output
    assert "5 row(s)" in res.output
    joined = run_sql(
        AuditConfig(root=str(root), corpus=CORPUS, gt=str(root / "gt.parquet")),
        "SELECT count(*) AS n FROM labels l JOIN gt USING (key) JOIN manifest m USING (key)",
    )
    assert joined["n"][0].as_py() == 5 * PER_SHARD  # every label row (the duplicate too) has its image and GT row
    bad = CliRunner().invoke(
        app, ["audit", "--corpus", CORPUS, "--root", str(root), "--sql", "SELECT nope FROM labels"]
    )
    assert bad.exit_code != 0


def test_compare_two_label_sets(tmp_path: Path) -> None:
    import shutil

    build_corpus(tmp_path, n_shards=2, faults=False, labelset="aaaa", seed=1)
    b = labels_dir(tmp_path, CORPUS, "bbbb")
    shutil.copytree(labels_dir(tmp_path, CORPUS, "aaaa"), b)
    # B: attribute 0 inverted and every part map blanked in shard 0; shard 1 identical to A
    path = label_shard_path(tmp_path, CORPUS, "bbbb", 0)
    t = pq.read_table(path)
    prob = np.stack(t["attr_prob"].to_numpy(zero_copy_only=False)).astype(np.uint8)
    prob[:, 0] = 255 - prob[:, 0]
    blank = np.zeros((t.num_rows, *GRID), np.uint8)
    pq.write_table(label_table(t["key"].to_pylist(), prob, blank), path)
    a_maps = np.stack([np.frombuffer(x, np.uint8) for x in t["part_map"].to_pylist()])
    cfg = AuditConfig(
        root=str(tmp_path),
        corpus=CORPUS,
        labelset="aaaa",
        compare="bbbb",
        out=str(tmp_path / "a"),
        mosaics=False,
        quiet=True,
    )
    summary = json.loads((run_audit(cfg).parent / "summary.json").read_text())
    m = summary["metrics"]
    assert m["compare_part_cell_agreement"] == pytest.approx(
        ((a_maps == 0).mean(1).sum() + PER_SHARD) / (2 * PER_SHARD)
    )
    assert m["compare_attribute_agreement"] == pytest.approx((0.5 + 25) / 26)
    rows = pq.read_table(tmp_path / "a" / "queries" / "compare_attributes.parquet").to_pylist()
    assert rows[0]["attribute"] == ATTRS[0] and rows[0]["agreement"] == 0.5
    assert _finding(summary, "decision changed")["where"] == ATTRS[0]


def test_pa100k_annotation_mat_as_ground_truth(tmp_path: Path) -> None:
    """annotation.mat (PA-100K layout) is mapped onto the corpus by image file name; mA equals gt.parquet's."""
    from pipeline.synth.layouts import write_pa100k_mat

    build_corpus(tmp_path, n_shards=2, faults=False)
    gt = pq.read_table(tmp_path / "gt.parquet").to_pylist()
    names = [r["source"].rsplit("/", 1)[1] for r in gt]
    labels = np.array([r["attributes"] for r in gt], np.uint8)
    cut = {"train": slice(0, 16), "val": slice(16, 20), "test": slice(20, None)}
    write_pa100k_mat(
        tmp_path / "annotation.mat", {k: names[c] for k, c in cut.items()}, {k: labels[c] for k, c in cut.items()}
    )
    metrics = {}
    for gt_path in ("annotation.mat", "gt.parquet"):
        cfg = AuditConfig(
            root=str(tmp_path),
            corpus=CORPUS,
            gt=str(tmp_path / gt_path),
            out=str(tmp_path / f"a_{gt_path}"),
            mosaics=False,
            quiet=True,
        )
        metrics[gt_path] = json.loads((run_audit(cfg).parent / "summary.json").read_text())["metrics"]
    assert metrics["annotation.mat"]["gt_images"] == 2 * PER_SHARD
    assert metrics["annotation.mat"]["attribute_mA"] == pytest.approx(metrics["gt.parquet"]["attribute_mA"])
    assert "part_mIoU" not in metrics["annotation.mat"] and "part_mIoU" in metrics["gt.parquet"]


def test_user_mistakes_name_the_fix(tmp_path: Path) -> None:
    from pipeline.errors import ClaspError

    build_corpus(tmp_path, n_shards=1, faults=False)
    with pytest.raises(ClaspError, match="corpus 'nope' not found"):
        run_sql(AuditConfig(root=str(tmp_path), corpus="nope"), "SELECT 1")
    with pytest.raises(ClaspError, match="labelset.json not found"):
        run_sql(AuditConfig(root=str(tmp_path), corpus=CORPUS, labelset="missing"), "SELECT 1")
    with pytest.raises(ClaspError, match="ground truth .* does not exist"):
        run_sql(AuditConfig(root=str(tmp_path), corpus=CORPUS, gt=str(tmp_path / "no.parquet")), "SELECT 1")
    with pytest.raises(ClaspError, match="memory_limit"):
        run_sql(AuditConfig(root=str(tmp_path), corpus=CORPUS, memory_limit="lots"), "SELECT 1")
