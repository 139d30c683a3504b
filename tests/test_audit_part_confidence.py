"""The audit shows part confidence per class (background included), comparable across classes, and warns
when part cells do not reach the part loss's threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.audit_corpus import CORPUS, PARTS, build_corpus

from labeling.audit import AuditConfig, run_audit
from pipeline.formats import labels_dir


def test_part_confidence_by_class_and_a_warning_when_parts_stay_under_the_threshold(tmp_path: Path) -> None:
    build_corpus(tmp_path, n_shards=2, faults=False)
    # background cells confident (200/255), part cells not (50/255 < 0.3): the synthetic run
    for path in sorted(labels_dir(tmp_path, CORPUS, "lset0001").glob("*.parquet")):
        table = pq.read_table(path)
        maps = [np.frombuffer(b, np.uint8) for b in table["part_map"].to_pylist()]
        conf = pa.array([np.where(m == 0, 200, 50).astype(np.uint8).tobytes() for m in maps], pa.binary())
        pq.write_table(table.set_column(table.schema.get_field_index("part_conf"), "part_conf", conf), path)
    cfg = AuditConfig(root=str(tmp_path), corpus=CORPUS, out=str(tmp_path / "audit"), mosaics=False, quiet=True)
    report = run_audit(cfg)
    rows = {r["part"]: r for r in pq.read_table(report.parent / "queries" / "part_confidence.parquet").to_pylist()}
    assert list(rows) == PARTS and rows["background"]["cells"] > 0
    assert rows["background"]["mean_confidence"] == pytest.approx(200 / 255)
    assert rows["background"]["share_above_threshold"] == 1.0
    assert rows["head"]["mean_confidence"] == pytest.approx(50 / 255) and rows["head"]["share_above_threshold"] == 0
    summary = json.loads((report.parent / "summary.json").read_text())
    weak = [f for f in summary["findings"] if "almost never reach confidence" in f["what"]]
    assert len(weak) == 1 and "loss/part will be 0" in weak[0]["what"] and weak[0]["severity"] == "warning"
    assert "Part confidence by class" in report.read_text()
