"""What every audit module shares: the settings, context and result types, and the DuckDB connection with
the audit's views (``labeling.audit`` lists them). The queries (``audit_queries``), the decoding metrics
(``audit_metrics``) and the report (``report``) import this module; it imports none of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import POSITIVE, PROBABILITY, ConfigError
from pipeline.errors import ClaspError
from pipeline.formats import (
    MANIFEST_FILE,
    SHARD_DIGITS,
    SIZES_FILE,
    images_dir,
    labels_dir,
    latest_labelset,
    read_labelset,
    shard_index,
)
from pipeline.vocab import load_attributes

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
def vocab_names(value: object, what: str) -> list[str] | None:
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


def sql_str(value: str | Path) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def label_files(root: str, corpus: str, labelset: str) -> list[Path]:
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


def labels_view_sql(files: list[Path]) -> str:
    flist = "[" + ", ".join(sql_str(f) for f in files) + "]"
    return (
        "SELECT * EXCLUDE (filename, file_row_number), "
        "regexp_extract(filename, '([^/\\\\]+)\\.parquet$', 1) AS shard, file_row_number AS row_idx "
        f"FROM read_parquet({flist}, filename = true, file_row_number = true)"
    )


def _resolve_context(cfg: AuditConfig) -> AuditContext:
    if not (Path(cfg.root) / cfg.corpus).is_dir():
        raise ClaspError(f"corpus '{cfg.corpus}' not found under {cfg.root} (expected {Path(cfg.root) / cfg.corpus})")
    try:
        labelset = cfg.labelset or latest_labelset(cfg.root, cfg.corpus)
        meta = read_labelset(cfg.root, cfg.corpus, labelset)
    except FileNotFoundError as exc:
        raise ClaspError(str(exc)) from None
    files = label_files(cfg.root, cfg.corpus, labelset)
    if not files:
        raise ClaspError(f"{labels_dir(cfg.root, cfg.corpus, labelset)} holds no label shards ({cfg.corpus}-*.parquet)")
    schema = pq.read_schema(files[0])
    n_attr = schema.field("attr_prob").type.list_size if "attr_prob" in schema.names else 0
    attributes = vocab_names(meta.get("attributes"), "attributes") or [f"attr{i + 1}" for i in range(n_attr)]
    if len(attributes) != n_attr:
        raise ClaspError(
            f"{files[0]}: attr_prob has {n_attr} values but labelset.json names {len(attributes)} attributes"
        )
    area_parts = [n[5:] for n in schema.names if n.startswith("area_")]
    parts = vocab_names(meta.get("parts"), "parts") or ["background", *area_parts]
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
    ctx = _resolve_context(cfg)
    if cfg.threads < 1:
        raise ConfigError(f"threads must be >= 1, got {cfg.threads}")
    con = duckdb.connect()
    try:
        con.execute(f"SET threads = {int(cfg.threads)}")
        con.execute(f"SET memory_limit = {sql_str(cfg.memory_limit)}")
    except duckdb.Error as exc:
        raise ConfigError(f"memory_limit '{cfg.memory_limit}' is not a DuckDB size (e.g. 2GB, 512MB): {exc}") from None
    if tmp_dir is not None:
        con.execute(f"SET temp_directory = {sql_str(tmp_dir)}")
    con.execute(f"CREATE VIEW labels AS {labels_view_sql(ctx.label_files)}")
    con.register("attributes", pa.table({"idx": list(range(1, len(ctx.attributes) + 1)), "name": ctx.attributes}))
    con.register("parts", pa.table({"id": list(range(len(ctx.parts))), "name": ctx.parts}))
    shard_no = "CAST(regexp_extract(shard, '(\\d+)$', 1) AS INTEGER)"
    con.execute(f"CREATE VIEW labels_pos AS SELECT key, {shard_no} AS shard_no, row_idx FROM labels")
    if ctx.has_manifest:
        path = sql_str(images_dir(cfg.root, cfg.corpus) / MANIFEST_FILE)
        typ = pq.read_schema(images_dir(cfg.root, cfg.corpus) / MANIFEST_FILE).field("shard").type
        number = (
            "shard" if pa.types.is_integer(typ) else "CAST(regexp_extract(shard, '(\\d+)(\\.tar)?$', 1) AS INTEGER)"
        )
        name = f"printf('%s-%0{SHARD_DIGITS}d', {sql_str(cfg.corpus)}, {number})"
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
        register_compare(con, ctx)
    if cfg.gt:
        register_gt(con, ctx)
    return con, ctx


def _file_rows(con: duckdb.DuckDBPyConnection, files: list[Path]) -> list[tuple[str, int]]:
    flist = "[" + ", ".join(sql_str(f) for f in files) + "]"
    return con.execute(f"SELECT file_name, num_rows FROM parquet_file_metadata({flist})").fetchall()


def fetch_table(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    rel = con.sql(sql)
    return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()


def decode_grids(arr: pa.Array | pa.ChunkedArray, cells: int) -> np.ndarray:
    """(N, cells) uint8 view of a binary column whose values are all ``cells`` bytes long."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if len(arr) == 0:
        return np.zeros((0, cells), np.uint8)
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], off_type)[arr.offset : arr.offset + len(arr) + 1]
    if arr.null_count or np.any(np.diff(offsets) != cells):
        raise ClaspError(f"part_map values are not all {cells} bytes (grid in labelset.json); the label set is damaged")
    data = np.frombuffer(arr.buffers()[2], np.uint8)
    return data[offsets[0] : offsets[-1]].reshape(len(arr), cells)


# --- optional views: --compare, --gt -----------------------------------------------------------
def register_compare(con: duckdb.DuckDBPyConnection, ctx: AuditContext) -> None:
    cfg = ctx.cfg
    try:
        meta = read_labelset(cfg.root, cfg.corpus, cfg.compare)
    except FileNotFoundError as exc:
        raise ClaspError(f"--compare {cfg.compare}: {exc}") from None
    files = label_files(cfg.root, cfg.corpus, cfg.compare)
    if not files:
        raise ClaspError(f"--compare {cfg.compare}: no label shards in its folder")
    con.execute(f"CREATE VIEW labels_b AS {labels_view_sql(files)}")
    ctx.compare_meta = {
        "attributes": vocab_names(meta.get("attributes"), "attributes") or [],
        "parts": vocab_names(meta.get("parts"), "parts") or [],
        "grid": tuple(meta["grid"]) if meta.get("grid") else None,
    }


def _read_annotation_mat(path: Path) -> tuple[pa.Table, list[str]]:
    """PA-100K annotation.mat -> (image, split, attributes uint8[A]) and the attribute names."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises several types for a damaged file
        raise ClaspError(f"{path}: not a readable MATLAB annotation file ({exc})") from None
    try:
        names = [str(np.squeeze(a)) for a in np.squeeze(mat["attributes"])]
        images, splits, labels = [], [], []
        for split in ("train", "val", "test"):
            cell = np.squeeze(mat[f"{split}_images_name"])
            images += [str(np.squeeze(c)) for c in np.atleast_1d(cell)]
            splits += [split] * np.atleast_1d(cell).size
            labels.append(np.asarray(mat[f"{split}_label"], np.uint8).reshape(-1, len(names)))
    except KeyError as exc:
        raise ClaspError(
            f"{path}: missing PA-100K field {exc} (attributes, <split>_images_name, <split>_label)"
        ) from None
    lab = np.concatenate(labels)
    attrs = pa.FixedSizeListArray.from_arrays(pa.array(lab.reshape(-1)), len(names))
    return pa.table({"image": images, "split": splits, "attributes": attrs}), names


def register_gt(con: duckdb.DuckDBPyConnection, ctx: AuditContext) -> None:
    """The ``gt`` view, keyed like ``labels``; sets ctx.gt_kind, gt_attributes, gt_has_parts."""
    path = Path(ctx.cfg.gt)
    if not path.is_file():
        raise ClaspError(f"ground truth {path} does not exist (give gt.parquet of `clasp synth` or annotation.mat)")
    if path.suffix == ".mat":
        table, names = _read_annotation_mat(path)
        if not ctx.has_manifest:
            raise ClaspError(f"{path}: mapping annotation.mat onto '{ctx.cfg.corpus}' needs its manifest.parquet")
        con.register("gt_mat", table)
        con.execute(
            "CREATE VIEW gt AS SELECT m.key, g.* FROM gt_mat g JOIN manifest m "
            "ON regexp_extract(m.source, '([^/\\\\]+)$', 1) = g.image"
        )
        ctx.gt_kind, ctx.gt_attributes, ctx.gt_has_parts = "mat", names, False
        return
    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise ClaspError(f"{path}: not a Parquet file ({exc})") from None
    if "key" not in schema.names or "attributes" not in schema.names:
        raise ClaspError(f"{path}: ground truth needs columns 'key' and 'attributes' (gt.parquet of `clasp synth`)")
    src = f"read_parquet({sql_str(path)})"
    on_key = con.execute(f"SELECT count(*) FROM {src} g SEMI JOIN labels_pos l USING (key)").fetchone()[0]
    view = f"SELECT * FROM {src}"
    if on_key == 0 and "source" in schema.names and ctx.has_manifest:
        on_src = con.execute(f"SELECT count(*) FROM {src} g SEMI JOIN manifest m USING (source)").fetchone()[0]
        if on_src:
            view = f"SELECT m.key, g.* EXCLUDE (key) FROM {src} g JOIN manifest m USING (source)"
    con.execute(f"CREATE VIEW gt AS {view}")
    n_attr = schema.field("attributes").type.list_size
    default = load_attributes().names
    meta = (schema.metadata or {}).get(b"attributes")
    names = meta.decode().split(",") if meta else default if n_attr == len(default) else []
    if len(names) != n_attr:
        raise ClaspError(f"{path}: {n_attr} ground-truth attributes but no names for them (expected PA-100K's 26)")
    ctx.gt_kind, ctx.gt_attributes, ctx.gt_has_parts = "parquet", names, "part_mask" in schema.names
