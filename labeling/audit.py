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
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import POSITIVE, PROBABILITY, ConfigError, save_config
from pipeline.errors import ClaspError
from pipeline.formats import (
    MANIFEST_FILE,
    SHARD_DIGITS,
    SIZES_FILE,
    atomic_path,
    images_dir,
    labels_dir,
    latest_labelset,
    read_labelset,
    shard_index,
    write_json_atomic,
)
from pipeline.progress import progress

SEVERITIES = ("error", "warning", "info")


@dataclass
class AuditConfig:
    """Settings of ``clasp audit``."""

    root: str = "data"
    corpus: str = "synthetic"
    labelset: str | None = None  # None = the most recently completed label set
    gt: str | None = None  # gt.parquet (synthetic world) or PA-100K annotation.mat
    compare: str | None = None  # a second label set id of the same corpus
    out: str = "runs/audit"
    memory_limit: str = "2GB"  # DuckDB memory limit; beyond it DuckDB spills to out/.duckdb_tmp
    threads: Annotated[int, POSITIVE] = 2
    uncertain_margin: Annotated[float, PROBABILITY] = 0.3  # an attribute value is uncertain when |2p - 1| < this
    low_confidence: Annotated[float, PROBABILITY] = 0.3  # image low-confidence: mean |2p - 1| over attributes < this
    vertical_order: list[str] = field(default_factory=lambda: ["head", "upper_clothes", "lower_clothes", "shoes"])
    order_margin: float = 0.06  # a part may sit this much (share of the height) below a lower part before flagged
    implausible_shard_share: float = 0.5  # a shard with more implausible part orders than this is an error
    consistency_sample: int = 512  # rows whose part maps are decoded to check the summary columns
    confidence_sample: int = 4096  # rows whose part maps and confidences are decoded for part_confidence
    part_conf_threshold: float = 0.3  # as pre-training's model.loss.part_conf_threshold: cells below are ignored
    mosaics: bool = True
    mosaic_per_attribute: int = 4  # most and least confident images per attribute
    mosaic_parts: int = 16  # random images with their part map overlaid
    mosaic_worst: int = 12  # worst agreement with ground truth / the compared set / implausible orders
    thumb_height_px: int = 128
    seed: int = 0
    quiet: bool = False


@dataclass
class Finding:
    severity: str  # error | warning | info
    what: str
    where: str
    count: int


@dataclass
class AuditContext:
    """What the views were built from."""

    cfg: AuditConfig
    labelset: str
    meta: dict
    attributes: list[str]
    parts: list[str]
    grid: tuple[int, int] | None
    label_files: list[Path]
    sizes: dict[str, int]  # image shard stem -> count
    has_manifest: bool
    gt_kind: str | None = None  # "parquet" | "mat"
    gt_has_parts: bool = False
    gt_attributes: list[str] = field(default_factory=list)
    compare_meta: dict | None = None


@dataclass
class AuditResult:
    ctx: AuditContext
    tables: dict[str, pa.Table]
    sql: dict[str, str]
    findings: list[Finding]
    metrics: dict[str, float]
    timings_s: dict[str, float]
    rows: int
    cpu_s: dict[str, float] = field(default_factory=dict)  # process CPU time (all threads) per step


# --- views ------------------------------------------------------------------------------------
def _names(value: object, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("names", value.get(what))
    if not isinstance(value, list):
        return None
    return [v["name"] if isinstance(v, dict) else str(v) for v in value]


def _shard_counts(meta: dict) -> dict[str, int]:
    """Per-shard row counts recorded in labelset.json, keyed by shard stem."""
    raw = meta.get("shards", meta.get("shard_rows", meta.get("counts", {})))
    if isinstance(raw, list):
        raw = {r.get("shard", r.get("name")): r.get("rows", r.get("count")) for r in raw if isinstance(r, dict)}
    if not isinstance(raw, dict):
        return {}
    out = {}
    for name, count in raw.items():
        if isinstance(count, dict):
            count = count.get("rows", count.get("count"))
        if isinstance(count, int):
            out[Path(str(name)).name.split(".")[0]] = count
    return out


def _sql_str(value: str | Path) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _label_files(root: str, corpus: str, labelset: str) -> list[Path]:
    files = sorted(labels_dir(root, corpus, labelset).glob(f"{corpus}-*.parquet"))
    for f in files:
        shard_index(f)  # a stray file with a non-shard name is a user mistake worth naming
        try:
            pq.read_metadata(f)  # the footer only: a truncated shard (killed copy, full disk) has none
        except (pa.ArrowInvalid, OSError) as exc:
            raise ClaspError(
                f"label shard {f} is unreadable ({str(exc).splitlines()[0]}); delete it and re-run `clasp label` "
                "for this corpus, it relabels that shard"
            ) from None
    return files


def _labels_view_sql(files: list[Path]) -> str:
    flist = "[" + ", ".join(_sql_str(f) for f in files) + "]"
    return (
        "SELECT * EXCLUDE (filename, file_row_number), "
        "regexp_extract(filename, '([^/\\\\]+)\\.parquet$', 1) AS shard, file_row_number AS row_idx "
        f"FROM read_parquet({flist}, filename = true, file_row_number = true)"
    )


def _resolve(cfg: AuditConfig) -> AuditContext:
    if not (Path(cfg.root) / cfg.corpus).is_dir():
        raise ClaspError(f"corpus '{cfg.corpus}' not found under {cfg.root} (expected {Path(cfg.root) / cfg.corpus})")
    try:
        labelset = cfg.labelset or latest_labelset(cfg.root, cfg.corpus)
        meta = read_labelset(cfg.root, cfg.corpus, labelset)
    except FileNotFoundError as exc:
        raise ClaspError(str(exc)) from None
    files = _label_files(cfg.root, cfg.corpus, labelset)
    if not files:
        raise ClaspError(f"{labels_dir(cfg.root, cfg.corpus, labelset)} holds no label shards ({cfg.corpus}-*.parquet)")
    schema = pq.read_schema(files[0])
    n_attr = schema.field("attr_prob").type.list_size if "attr_prob" in schema.names else 0
    attributes = _names(meta.get("attributes"), "attributes") or [f"attr{i + 1}" for i in range(n_attr)]
    if len(attributes) != n_attr:
        raise ClaspError(
            f"{files[0]}: attr_prob has {n_attr} values but labelset.json names {len(attributes)} attributes"
        )
    area_parts = [n[5:] for n in schema.names if n.startswith("area_")]
    parts = _names(meta.get("parts"), "parts") or ["background", *area_parts]
    if parts[1:] != area_parts:
        raise ClaspError(f"{files[0]}: area_* columns {area_parts} do not match labelset.json parts {parts[1:]}")
    grid = tuple(int(g) for g in meta["grid"]) if meta.get("grid") else None
    sizes_path = images_dir(cfg.root, cfg.corpus) / SIZES_FILE
    sizes = {}
    if sizes_path.is_file():
        sizes = {Path(k).name.split(".")[0]: int(v) for k, v in json.loads(sizes_path.read_text()).items()}
    has_manifest = (images_dir(cfg.root, cfg.corpus) / MANIFEST_FILE).is_file()
    return AuditContext(cfg, labelset, meta, attributes, parts, grid, files, sizes, has_manifest)


def connect(cfg: AuditConfig, tmp_dir: Path | None = None) -> tuple[duckdb.DuckDBPyConnection, AuditContext]:
    """A DuckDB connection (threads, memory limit) with every audit view registered."""
    ctx = _resolve(cfg)
    if cfg.threads < 1:
        raise ConfigError(f"threads must be >= 1, got {cfg.threads}")
    con = duckdb.connect()
    try:
        con.execute(f"SET threads = {int(cfg.threads)}")
        con.execute(f"SET memory_limit = {_sql_str(cfg.memory_limit)}")
    except duckdb.Error as exc:
        raise ConfigError(f"memory_limit '{cfg.memory_limit}' is not a DuckDB size (e.g. 2GB, 512MB): {exc}") from None
    if tmp_dir is not None:
        con.execute(f"SET temp_directory = {_sql_str(tmp_dir)}")
    con.execute(f"CREATE VIEW labels AS {_labels_view_sql(ctx.label_files)}")
    con.register("attributes", pa.table({"idx": list(range(1, len(ctx.attributes) + 1)), "name": ctx.attributes}))
    con.register("parts", pa.table({"id": list(range(len(ctx.parts))), "name": ctx.parts}))
    shard_no = "CAST(regexp_extract(shard, '(\\d+)$', 1) AS INTEGER)"
    con.execute(f"CREATE VIEW labels_pos AS SELECT key, {shard_no} AS shard_no, row_idx FROM labels")
    if ctx.has_manifest:
        path = _sql_str(images_dir(cfg.root, cfg.corpus) / MANIFEST_FILE)
        typ = pq.read_schema(images_dir(cfg.root, cfg.corpus) / MANIFEST_FILE).field("shard").type
        number = (
            "shard" if pa.types.is_integer(typ) else "CAST(regexp_extract(shard, '(\\d+)(\\.tar)?$', 1) AS INTEGER)"
        )
        name = f"printf('%s-%0{SHARD_DIGITS}d', {_sql_str(cfg.corpus)}, {number})"
        con.execute(f"CREATE VIEW manifest AS SELECT * REPLACE ({name} AS shard) FROM read_parquet({path})")
        con.execute(
            f'CREATE VIEW manifest_pos AS SELECT key, {number}::INTEGER AS shard_no, "index" AS image_index '
            f"FROM read_parquet({path})"
        )
    recorded = _shard_counts(ctx.meta)
    names = sorted(set(ctx.sizes) | set(recorded) | {f.stem for f in ctx.label_files})
    footer = {Path(r[0]).stem: r[1] for r in _file_rows(con, ctx.label_files)}
    con.register(
        "shards",
        pa.table(
            {
                "shard": names,
                "shard_no": pa.array([shard_index(n) for n in names], pa.int32()),
                "images": pa.array([ctx.sizes.get(n) for n in names], pa.int64()),
                "recorded": pa.array([recorded.get(n) for n in names], pa.int64()),
                "label_rows": pa.array([footer.get(n) for n in names], pa.int64()),
                "label_file": [n in footer for n in names],
            }
        ),
    )
    if cfg.compare:
        from labeling.audit_metrics import register_compare

        register_compare(con, ctx)
    if cfg.gt:
        from labeling.audit_metrics import register_gt

        register_gt(con, ctx)
    return con, ctx


def _file_rows(con: duckdb.DuckDBPyConnection, files: list[Path]) -> list[tuple[str, int]]:
    flist = "[" + ", ".join(_sql_str(f) for f in files) + "]"
    return con.execute(f"SELECT file_name, num_rows FROM parquet_file_metadata({flist})").fetchall()


def fetch_table(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    rel = con.sql(sql)
    return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()


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
    from labeling.audit_queries import derive_findings, standard_queries

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
    from labeling.audit_metrics import decode_grids

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
    from labeling.audit_metrics import decode_grids

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
    from labeling.audit_metrics import compare_labelsets, gt_metrics, select_mosaics
    from labeling.audit_queries import standard_queries
    from labeling.report import write_report

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
