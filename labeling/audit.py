"""Label audits (stage 1b): DuckDB views over label shards, standard audit queries, findings, report.

    clasp audit --corpus luperson --root data --out runs/audit
    clasp audit --corpus synthetic --root data --gt data/synthetic-world/gt.parquet --out runs/audit
    clasp audit --corpus luperson --root data --compare 3f9a2c1b --out runs/audit_vs_3f9a
    clasp audit --corpus luperson --root data --sql "SELECT shard, count(*) FROM labels GROUP BY ALL"

Views registered on one DuckDB connection (over the files themselves; ad-hoc SQL sees the same ones):

    labels      every label-shard column + ``shard`` ('<corpus>-NNNNNN') + ``row_idx`` (row in its file)
    labels_b    the ``--compare`` label set, same columns
    manifest    manifest.parquet, ``shard`` as '<corpus>-NNNNNN'
    gt          ground truth keyed like ``labels`` (gt.parquet, or PA-100K annotation.mat mapped by file name)
    attributes  idx (1-based position in attr_prob), name
    parts       id (class id in part_map), name
    shards      shard, images (sizes.json), recorded (labelset.json), label_rows (file footer), label_file

Standard audits read a narrow in-database copy ``lab`` of the labels (key, shard, row_idx, one uint8
column ``a<idx>`` per attribute, fg_ratio, area_*/row_*): one pass over the Parquet files instead of
one per query; DuckDB keeps it within ``memory_limit`` (spilling to disk beyond it). Part maps are
decoded only for samples, ground truth, label-set comparison and mosaics.

Outputs in ``out``: report.html, summary.json (findings first), queries/<name>.{parquet,csv,sql},
audit_config.yaml. Protocols of the ground-truth metrics: labeling/quality.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from labeling.audit_metrics import compare_labelsets, gt_metrics, select_mosaics
from labeling.audit_queries import derive_findings, standard_queries
from labeling.audit_views import (
    SEVERITIES,
    AuditConfig,
    AuditContext,
    AuditResult,
    connect,
    decode_grids,
    fetch_table,
)
from labeling.report import write_report
from pipeline.config import save_config
from pipeline.errors import ClaspError
from pipeline.formats import atomic_path, write_json_atomic
from pipeline.progress import progress

# what callers import from here (the types and views live in labeling.audit_views)
__all__ = [
    "SEVERITIES", "AuditConfig", "AuditContext", "AuditResult", "connect", "print_table", "run_audit", "run_sql",
    "run_standard_audit", "summary_dict",
]  # fmt: skip


def run_sql(cfg: AuditConfig, sql: str) -> pa.Table:
    """Run one ad-hoc query over the audit views; returns its result."""
    tmp = Path(tempfile.mkdtemp(prefix="clasp_audit_sql_"))
    con, _ = connect(cfg, tmp)
    try:
        return fetch_table(con, sql)
    except duckdb.Error as exc:
        raise ClaspError(f"query failed: {exc}".splitlines()[0] + " (views: labels, manifest, shards, ...)") from None
    finally:
        con.close()
        shutil.rmtree(tmp, ignore_errors=True)


# --- standard audits ----------------------------------------------------------------------------
def run_standard_audit(
    cfg: AuditConfig,
    con: duckdb.DuckDBPyConnection | None = None,
    ctx: AuditContext | None = None,
    on_step: Callable[[str], None] | None = None,
) -> AuditResult:
    """Every standard audit query (no ground truth, comparison or mosaics) and the findings drawn from them."""
    tmp = None
    if con is None:
        tmp = Path(tempfile.mkdtemp(prefix="clasp_audit_"))
        con, ctx = connect(cfg, tmp)
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    tables: dict[str, pa.Table] = {}
    sql: dict[str, str] = {}

    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        timings[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
        if on_step is not None:
            on_step(name)

    try:
        with step("load"):
            con.execute("SET preserve_insertion_order = false")  # lets all threads write the copy
            con.execute(f"CREATE OR REPLACE TEMP TABLE lab AS {_lab_sql(ctx)}")
            rows = con.execute("SELECT count(*) FROM lab").fetchone()[0]
        for name, query in standard_queries(ctx).items():
            with step(name):
                if query.setup:
                    con.execute(query.setup)
                tables[name] = fetch_table(con, query.sql)
            sql[name] = (query.setup.strip() + ";\n" if query.setup else "") + query.sql.strip()
        if "part_order_examples" in tables:
            tables["part_order_examples"] = _attach_keys(ctx, tables["part_order_examples"])
        with step("summary_consistency"):
            tables["summary_consistency"] = _consistency_sample(ctx)
        with step("part_confidence"):
            tables["part_confidence"] = _part_confidence_sample(ctx)
        findings = derive_findings(ctx, tables)
        con.execute("RESET preserve_insertion_order")
    finally:
        if tmp is not None:
            con.close()
            shutil.rmtree(tmp, ignore_errors=True)
    return AuditResult(ctx, tables, sql, findings, {}, timings, rows, cpu)


def _lab_sql(ctx: AuditContext) -> str:
    attrs = ", ".join(f"attr_prob[{i}] AS a{i}" for i in range(1, len(ctx.attributes) + 1))
    parts = ", ".join(f"area_{p}, row_{p}" for p in ctx.parts[1:])
    shard_no = "CAST(regexp_extract(shard, '(\\d+)$', 1) AS INTEGER)"
    return f"SELECT {shard_no} AS shard_no, row_idx, fg_ratio, {attrs}, {parts} FROM labels"


def _attach_keys(ctx: AuditContext, table: pa.Table) -> pa.Table:
    """Prepend the ``key`` of each (shard, row_idx) row, read from the few label files involved."""
    files = {f.stem: f for f in ctx.label_files}
    keys = {}
    for shard in set(table["shard"].to_pylist()):
        col = pq.read_table(files[shard], columns=["key"])["key"]
        for i in table.filter(pc.equal(table["shard"], shard))["row_idx"].to_pylist():
            keys[(shard, i)] = col[i].as_py()
    return table.add_column(
        0,
        "key",
        pa.array(
            [keys[(s, i)] for s, i in zip(table["shard"].to_pylist(), table["row_idx"].to_pylist(), strict=True)],
            pa.string(),
        ),
    )


def _consistency_sample(ctx: AuditContext) -> pa.Table:
    """Decode a few part maps per shard and recompute area_/row_ to catch summaries out of step with the maps.

    Definitions as labeling.writer stores them: area = cells of the class / all cells * 255 (+-1 for
    rounding); row = mean of the cells' row positions (0 = top row .. 1 = bottom row) * 255 (+-2).
    """
    out = {"shard": [], "rows": [], "bad_length": [], "bad_class": [], "area_mismatch": [], "row_mismatch": []}
    if ctx.grid is None:
        return pa.table(out, schema=pa.schema([(k, pa.string() if k == "shard" else pa.int64()) for k in out]))
    rng = np.random.default_rng(ctx.cfg.seed)
    n_files = min(len(ctx.label_files), 8)
    files = [ctx.label_files[i] for i in sorted(rng.choice(len(ctx.label_files), n_files, replace=False))]
    per_file = max(1, ctx.cfg.consistency_sample // n_files)
    cols = ["part_map"] + [f"{k}_{p}" for k in ("area", "row") for p in ctx.parts[1:]]
    gh, gw = ctx.grid
    row_of_cell = np.repeat(np.linspace(0.0, 1.0, gh) if gh > 1 else np.zeros(1), gw)
    for f in files:
        pf = pq.ParquetFile(f)
        if pf.metadata.num_rows == 0:
            continue
        t = pf.read_row_group(0, columns=cols).slice(0, per_file)
        ok = pc.equal(pc.binary_length(t["part_map"]), gh * gw)
        good = t.filter(ok)
        maps = decode_grids(good["part_map"], gh * gw)
        area_bad = row_bad = 0
        for c, name in enumerate(ctx.parts[1:], start=1):
            hit = maps == c
            cnt = hit.sum(1)
            area = good[f"area_{name}"].to_numpy(zero_copy_only=False).astype(float)
            area_bad += int((np.abs(area - cnt / (gh * gw) * 255) > 1.01).sum())
            stored = good[f"row_{name}"].to_numpy(zero_copy_only=False).astype(float)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean_row = (hit * row_of_cell).sum(1) / cnt * 255
            both = (cnt > 0) & ~np.isnan(stored)
            row_bad += int((np.abs(stored[both] - mean_row[both]) > 2.01).sum())
            row_bad += int(((cnt > 0) != ~np.isnan(stored)).sum())  # present in the map but null, or the reverse
        for key, value in [
            ("shard", f.stem),
            ("rows", t.num_rows),
            ("bad_length", t.num_rows - good.num_rows),
            ("bad_class", int((maps >= len(ctx.parts)).any(1).sum())),
            ("area_mismatch", area_bad),
            ("row_mismatch", row_bad),
        ]:
            out[key].append(value)
    return pa.table(out)


def _part_confidence_sample(ctx: AuditContext) -> pa.Table:
    """Per part class, background included, over decoded sample rows: cells, mean confidence and the share
    of cells at or above ``part_conf_threshold`` (the cells the pre-training part loss learns from).

    Confidences mean the same for background and parts (labeling.labelers), so the rows are comparable:
    a class far below the others teaches the part loss little.
    """
    names, threshold = ctx.parts, ctx.cfg.part_conf_threshold
    cells = np.zeros(len(names), np.int64)
    conf_sum = np.zeros(len(names))
    above = np.zeros(len(names), np.int64)
    if ctx.grid is not None and ctx.label_files:
        n_cells = ctx.grid[0] * ctx.grid[1]
        rng = np.random.default_rng(ctx.cfg.seed)
        n_files = min(len(ctx.label_files), 16)  # a bounded read however large the corpus (audit time budget)
        files = [ctx.label_files[i] for i in sorted(rng.choice(len(ctx.label_files), n_files, replace=False))]
        per_file = max(1, ctx.cfg.confidence_sample // n_files)
        for f in files:
            pf = pq.ParquetFile(f)
            if pf.metadata.num_rows == 0:
                continue
            t = pf.read_row_group(int(rng.integers(pf.num_row_groups)), columns=["part_map", "part_conf"])
            t = t.slice(0, per_file)
            ok = pc.and_(
                pc.equal(pc.binary_length(t["part_map"]), n_cells), pc.equal(pc.binary_length(t["part_conf"]), n_cells)
            )
            t = t.filter(ok)
            maps = decode_grids(t["part_map"], n_cells).ravel().astype(np.int64)
            conf = decode_grids(t["part_conf"], n_cells).ravel() / 255.0
            known = maps < len(names)
            maps, conf = maps[known], conf[known]
            cells += np.bincount(maps, minlength=len(names))
            conf_sum += np.bincount(maps, weights=conf, minlength=len(names))
            above += np.bincount(maps[conf >= threshold - 1e-9], minlength=len(names))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean, share = conf_sum / cells, above / cells
    return pa.table(
        {
            "id": pa.array(range(len(names)), pa.int32()),
            "part": names,
            "cells": cells,
            "cell_share": cells / max(1, cells.sum()),
            "mean_confidence": pa.array(np.where(cells > 0, mean, np.nan), from_pandas=True),
            "threshold": np.full(len(names), threshold),
            "share_above_threshold": pa.array(np.where(cells > 0, share, np.nan), from_pandas=True),
        }
    )


# --- the whole audit ---------------------------------------------------------------------------
def run_audit(cfg: AuditConfig) -> Path:
    """Standard audits (+ ground truth, + comparison), summary.json, query results and report.html; returns its path."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ClaspError(f"--out {out} is a file; give a directory for the report and query results")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".duckdb_tmp"
    con, ctx = connect(cfg, tmp)
    steps = len(standard_queries(ctx)) + 4 + bool(cfg.compare) + bool(cfg.gt) + cfg.mosaics
    try:
        with progress(steps, "audit", quiet=cfg.quiet, unit="step") as advance:

            def done(name: str) -> None:
                advance(1, step=name)

            result = run_standard_audit(cfg, con, ctx, on_step=done)
            for name, wanted, fn in [
                ("compare", cfg.compare, compare_labelsets),
                ("ground_truth", cfg.gt, gt_metrics),
            ]:
                if wanted:
                    t0 = time.perf_counter()
                    fn(con, ctx, result)
                    result.timings_s[name] = time.perf_counter() - t0
                    done(name)
            mosaics = select_mosaics(con, ctx, result) if cfg.mosaics else {}
            done("mosaics")
            result.findings.sort(key=lambda f: (SEVERITIES.index(f.severity), -f.count))
            _write_tables(out / "queries", result)
            save_config(cfg, out / "audit_config.yaml")
            write_json_atomic(out / "summary.json", summary_dict(result))
            report = write_report(out / "report.html", result, mosaics)
    finally:
        con.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if not cfg.quiet:
        counts = {s: sum(f.severity == s for f in result.findings) for s in SEVERITIES}
        print(
            f"audit of {cfg.corpus}/{ctx.labelset}: {result.rows:,} rows, {counts['error']} errors, "
            f"{counts['warning']} warnings ({sum(result.timings_s.values()):.1f} s)"
        )
        for f in result.findings:
            if f.severity != "info":
                print(f"  {f.severity}: {f.what} [{f.where}] x{f.count}")
    return report


def summary_dict(result: AuditResult) -> dict:
    ctx = result.ctx
    return {
        "findings": [dataclasses.asdict(f) for f in result.findings],
        "corpus": ctx.cfg.corpus,
        "labelset": ctx.labelset,
        "compare": ctx.cfg.compare,
        "gt": ctx.cfg.gt,
        "rows": result.rows,
        "metrics": result.metrics,
        "queries": sorted(result.tables),
        "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()},
    }


def _write_tables(qdir: Path, result: AuditResult) -> None:
    qdir.mkdir(parents=True, exist_ok=True)
    for old in qdir.iterdir():  # results of an earlier run (e.g. with --gt) must not pass for this run's
        if old.suffix in (".parquet", ".csv", ".sql") and old.stem not in result.tables:
            old.unlink()
    for name, table in result.tables.items():
        with atomic_path(qdir / f"{name}.parquet") as tmp:
            pq.write_table(table, tmp)
        flat = table.select([c for c in table.column_names if not pa.types.is_nested(table.schema.field(c).type)])
        with atomic_path(qdir / f"{name}.csv") as tmp:
            pacsv.write_csv(flat, tmp)
        if name in result.sql:
            with atomic_path(qdir / f"{name}.sql") as tmp:
                tmp.write_text(result.sql[name].strip() + ";\n")


def print_table(table: pa.Table, max_rows: int = 100) -> None:
    """Print a query result as a table (first ``max_rows`` rows) with its row count."""
    from rich.console import Console
    from rich.table import Table

    out = Table(*table.column_names, show_lines=False)
    for row in table.slice(0, max_rows).to_pylist():
        out.add_row(*("" if v is None else str(v) for v in row.values()))
    console = Console(width=max(Console().width, 160))
    console.print(out)
    more = f", first {max_rows} shown" if table.num_rows > max_rows else ""
    console.print(f"{table.num_rows} row(s){more}")
