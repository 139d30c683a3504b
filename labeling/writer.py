"""Label shard writing: quantisation, one Parquet file per image shard, and labelset.json.

The schema is pipeline.formats.label_schema; probabilities become uint8 x*255, part confidence is
further snapped to ``conf_levels`` values so zstd packs a part map + confidence into a few dozen
bytes. Each shard carries its writer's facts (label set, rank, undecodable keys) in the Parquet
key-value metadata under ``clasp``, so labelset.json can be assembled from the files alone.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from labeling.image_shards import ShardIndex
from labeling.labelers import LabelBatch
from pipeline.formats import LABELSET_FILE, atomic_path, write_json_atomic

COLUMN_DOC = {
    "key": "image key, same row order as the image shard",
    "attr_prob": "uint8[A]: P(attribute)*255, order = attributes.names",
    "part_map": "grid_h*grid_w bytes, row-major uint8 part class ids (parts.names), 0 = background",
    "part_conf": "grid_h*grid_w bytes, uint8 confidence*255 of the part_map class (part_conf_levels levels)",
    "fg_ratio": "float32 share of cells labelled person",
    "area_<part>": "uint8 share of cells of that class * 255",
    "row_<part>": "uint8 mean row of that class (0 top .. 255 bottom), null if absent",
    "clip_embed": "optional float16 little-endian image embedding",
}


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("clasp")
    except PackageNotFoundError:
        ver = "unknown"
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{ver}+g{rev}" if rev else ver


def quantize(x: np.ndarray, levels: int = 256) -> np.ndarray:
    """[0, 1] floats -> uint8 x*255, snapped to ``levels`` evenly spaced values."""
    x = np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0)
    return (np.round(np.round(x * (levels - 1)) * (255.0 / (levels - 1)))).astype(np.uint8)


class ShardBuffer:
    """Collects one shard's label rows (in order) until the shard is complete."""

    def __init__(self, index: ShardIndex) -> None:
        self.index = index
        self.parts: list[tuple[np.ndarray, LabelBatch, torch.Tensor | None]] = []
        self.filled = 0

    def add(self, positions: np.ndarray, labels: LabelBatch, embed: torch.Tensor | None) -> None:
        self.parts.append((positions, labels, embed))
        self.filled += len(positions)

    @property
    def complete(self) -> bool:
        return self.filled == len(self.index.keys)

    def table(self, schema: pa.Schema, part_names: list[str], conf_levels: int) -> pa.Table:
        order = np.argsort(np.concatenate([p for p, _, _ in self.parts]), kind="stable")

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(lb, name).numpy() for _, lb, _ in self.parts])[order]

        n = len(order)
        attr = quantize(cat("attr_prob"))
        part_map = np.ascontiguousarray(cat("part_map").reshape(n, -1))
        part_conf = quantize(cat("part_conf").reshape(n, -1), conf_levels)
        area = quantize(cat("area"))
        row = cat("row")
        cols = {
            "key": pa.array(self.index.keys, pa.string()),
            "attr_prob": pa.FixedSizeListArray.from_arrays(pa.array(attr.reshape(-1)), attr.shape[1]),
            "part_map": pa.array([r.tobytes() for r in part_map], pa.binary()),
            "part_conf": pa.array([r.tobytes() for r in part_conf], pa.binary()),
            "fg_ratio": pa.array(cat("fg_ratio").astype(np.float32)),
        }
        for j, name in enumerate(part_names[1:]):
            cols[f"area_{name}"] = pa.array(area[:, j])
        for j, name in enumerate(part_names[1:]):
            cols[f"row_{name}"] = pa.array(quantize(row[:, j]), mask=np.isnan(row[:, j]))
        if "clip_embed" in schema.names:
            emb = torch.cat([e for _, _, e in self.parts]).numpy()[order].astype("<f2")
            cols["clip_embed"] = pa.array([r.tobytes() for r in emb], pa.binary())
        return pa.table([cols[f.name] for f in schema], schema=schema)


def blank_rows(labels: LabelBatch, rows: np.ndarray) -> None:
    """Rows whose image did not decode: background everywhere with zero confidence, no attributes."""
    rows_t = torch.as_tensor(rows)
    for t in (labels.attr_prob, labels.part_map, labels.part_conf, labels.fg_ratio, labels.area):
        t[rows_t] = 0
    labels.row[rows_t] = float("nan")


def write_shard(path: Path, table: pa.Table, metadata: dict) -> None:
    table = table.replace_schema_metadata({"clasp": json.dumps(metadata)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", compression_level=9)


def finalize_labelset(out_dir: Path, shard_paths: list[Path], header: dict) -> bool:
    """Write ``out_dir/labelset.json`` (header + per-shard rows + failures) if every shard exists."""
    rows, failures = {}, []
    for path in shard_paths:
        if not path.is_file():
            return False
        meta = pq.read_metadata(path)
        info = json.loads((meta.schema.to_arrow_schema().metadata or {}).get(b"clasp", b"{}"))
        rows[path.name] = meta.num_rows
        failures += [{"shard": path.name, "key": k, "reason": "undecodable image"} for k in info.get("undecodable", [])]
    for stale in out_dir.glob("*.parquet.tmp-*"):  # left by killed runs; every shard is final now
        stale.unlink(missing_ok=True)
    doc = {**header, "columns": COLUMN_DOC, "shards": rows, "rows": sum(rows.values()), "failures": failures}
    write_json_atomic(out_dir / LABELSET_FILE, doc)
    for stale in out_dir.glob(f"{LABELSET_FILE}.tmp-*"):  # a run killed while writing it (not a live writer)
        if not _alive(stale.name.rsplit(".tmp-", 1)[1]):
            stale.unlink(missing_ok=True)
    return True


def _alive(pid: str) -> bool:
    """Whether a process with this id runs on this machine (a temp file's writer may still be working)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
