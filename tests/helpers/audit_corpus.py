"""A label corpus for the audit, built without the labeler: tiny image tars, manifest.parquet, sizes.json,
label shards written with pipeline.formats.label_schema, labelset.json and a gt.parquet in the synthetic
world's schema. Labels are ground truth with known noise; ``faults`` plants one fault into each chosen shard.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.formats import (
    LABELSET_FILE,
    MANIFEST_FILE,
    SIZES_FILE,
    image_shard_path,
    label_schema,
    label_shard_path,
    labels_dir,
    shard_stem,
)
from pipeline.vocab import load_attributes, load_parts

CORPUS = "toy"
GRID = (16, 8)
PER_SHARD = 12
SCALE = 4  # image pixels per grid cell, so pooling the GT mask onto the grid is exact
ATTRS = load_attributes().names
PARTS = list(load_parts().names)
# (class, top, bottom) of a standing person in grid rows
BODY = (
    ("head", 0, 2),
    ("face", 2, 3),
    ("upper_clothes", 3, 8),
    ("lower_clothes", 8, 12),
    ("legs", 12, 14),
    ("shoes", 14, 16),
)


def _person(rng: np.random.Generator) -> np.ndarray:
    """A (16, 8) ground-truth part grid: body bands in the middle columns, arms at the sides, maybe a bag."""
    g = np.zeros(GRID, np.uint8)
    left, right = int(rng.integers(1, 3)), int(rng.integers(6, 8))
    for name, top, bottom in BODY:
        g[top:bottom, left:right] = PARTS.index(name)
    g[3:8, left - 1] = PARTS.index("arms")
    if rng.random() < 0.5:
        g[6:9, right] = PARTS.index("accessories")
    return g


def _summaries(grids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """area_/row_ columns as labeling.writer stores them: share*255 and mean row (0..1 over rows)*255."""
    n = len(grids)
    flat = grids.reshape(n, -1)
    rows = np.repeat(np.linspace(0, 1, GRID[0]), GRID[1])
    area = np.zeros((n, len(PARTS) - 1), np.uint8)
    row = np.full((n, len(PARTS) - 1), np.nan)
    for c in range(1, len(PARTS)):
        hit = flat == c
        cnt = hit.sum(1)
        area[:, c - 1] = np.round(cnt / flat.shape[1] * 255)
        with np.errstate(invalid="ignore", divide="ignore"):
            row[:, c - 1] = np.where(cnt > 0, np.round((hit * rows).sum(1) / cnt * 255), np.nan)
    return area, row


def label_table(keys: list[str], prob: np.ndarray, grids: np.ndarray) -> pa.Table:
    n = len(keys)
    area, row = _summaries(grids)
    cols = {
        "key": pa.array(keys),
        "attr_prob": pa.FixedSizeListArray.from_arrays(pa.array(prob.reshape(-1)), len(ATTRS)),
        "part_map": pa.array([g.tobytes() for g in grids], pa.binary()),
        "part_conf": pa.array([np.full(GRID, 200, np.uint8).tobytes()] * n, pa.binary()),
        "fg_ratio": pa.array((grids.reshape(n, -1) > 0).mean(1).astype(np.float32)),
    }
    for j, name in enumerate(PARTS[1:]):
        cols[f"area_{name}"] = pa.array(area[:, j])
    for j, name in enumerate(PARTS[1:]):
        cols[f"row_{name}"] = pa.array(np.nan_to_num(row[:, j]).astype(np.uint8), mask=np.isnan(row[:, j]))
    return pa.table(cols, schema=label_schema(len(ATTRS), PARTS))


def build_corpus(root: Path, n_shards: int = 6, faults: bool = True, labelset: str = "lset0001", seed: int = 0):
    """Image tars + manifest + sizes.json + label shards + labelset.json + gt.parquet under ``root``.

    Faults (when ``faults``): shard 1 rows shuffled, shard 2 label file missing, shard 3 part maps flipped
    upside down (summaries recomputed, as a labeler bug would), shard 4 row 7 carries row 2's key, shard 5
    row 0 has an area_head that does not match its part map.
    Returns a dict with the ground truth and the labels actually written (for direct metric checks).
    """
    rng = np.random.default_rng(seed)
    out = {"keys": [], "gt_attr": [], "gt_grid": [], "prob": [], "pred_grid": []}
    manifest, gt_rows, sizes, shard_rows = [], [], {}, {}
    palette = np.array([[90, 90, 90], *(rng.integers(0, 255, (len(PARTS) - 1, 3)))], np.uint8)
    for s in range(n_shards):
        keys = [f"cam{s}_p{i:03d}_f{rng.integers(1e6):06d}" for i in range(PER_SHARD)]
        gt_grid = np.stack([_person(rng) for _ in keys])
        gt_attr = (rng.random((PER_SHARD, len(ATTRS))) < 0.3).astype(np.uint8)
        # labels = ground truth + noise: flipped attribute probabilities for 15%, 10% of cells relabelled
        p = np.where(gt_attr == 1, rng.uniform(0.55, 1, gt_attr.shape), rng.uniform(0, 0.45, gt_attr.shape))
        flip = rng.random(p.shape) < 0.15
        prob = np.round(np.where(flip, 1 - p, p) * 255).astype(np.uint8)
        pred = gt_grid.copy()
        noise = rng.random(pred.shape) < 0.1
        pred[noise] = rng.integers(0, len(PARTS), noise.sum())
        tar_path = image_shard_path(root, CORPUS, s)
        tar_path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar_path, "w") as tar:
            for i, key in enumerate(keys):
                mask = np.kron(gt_grid[i], np.ones((SCALE, SCALE), np.uint8))
                rgb = palette[mask] + rng.integers(0, 20, (*mask.shape, 3)).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
                for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.json", b'{"width": 32, "height": 64}')):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                png = io.BytesIO()
                Image.fromarray(mask).save(png, format="PNG")
                source = f"cam{s}/{key}.jpg"
                gt_rows.append(
                    {"key": key, "source": source, "attributes": gt_attr[i].tolist(), "part_mask": png.getvalue()}
                    | {"width": 32, "height": 64}
                )
                manifest.append(
                    {"key": key, "shard": s, "index": i, "width": 32, "height": 64, "n_bytes": len(buf.getvalue())}
                    | {"content_hash": f"{s}-{i}", "source": source}
                )
        sizes[f"{shard_stem(CORPUS, s)}.tar"] = PER_SHARD
        lkeys, lprob, lpred = list(keys), prob, pred
        if faults and s == 1:
            perm = rng.permutation(PER_SHARD)
            lkeys, lprob, lpred = [keys[j] for j in perm], prob[perm], pred[perm]
        if faults and s == 3:
            lpred = pred[:, ::-1, :].copy()
        if faults and s == 4:
            lkeys[7] = lkeys[2]
        if faults and s == 2:
            out.setdefault("missing_keys", keys)
        else:
            table = label_table(lkeys, lprob, lpred)
            if faults and s == 5:  # a summary column out of step with its part map
                area = table["area_head"].to_numpy().copy()
                area[0] += 40
                table = table.set_column(table.schema.get_field_index("area_head"), "area_head", pa.array(area))
            path = label_shard_path(root, CORPUS, labelset, s)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
            shard_rows[path.name] = table.num_rows
            out["keys"] += lkeys
            out["prob"].append(lprob)
            out["pred_grid"].append(lpred)
            # ground truth rows in the order of the written labels, for the direct metric computation
            order = [keys.index(k) for k in lkeys]
            out["gt_attr"].append(gt_attr[order])
            out["gt_grid"].append(gt_grid[order])
    img = root / CORPUS / "images"
    pq.write_table(pa.Table.from_pylist(manifest), img / MANIFEST_FILE)
    (img / SIZES_FILE).write_text(json.dumps(sizes))
    meta = {
        "labelset": labelset,
        "corpus": CORPUS,
        "grid": list(GRID),
        "attributes": {"names": ATTRS},
        "parts": {"names": PARTS},
        "shards": shard_rows,
        "rows": sum(shard_rows.values()),
    }
    (labels_dir(root, CORPUS, labelset) / LABELSET_FILE).write_text(json.dumps(meta))
    gt_schema = pa.schema(
        [
            ("key", pa.string()),
            ("source", pa.string()),
            ("attributes", pa.list_(pa.uint8(), 26)),
            ("part_mask", pa.binary()),
            ("width", pa.int32()),
            ("height", pa.int32()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(gt_rows, schema=gt_schema), root / "gt.parquet")
    return {k: (np.concatenate(v) if k in ("gt_attr", "gt_grid", "prob", "pred_grid") else v) for k, v in out.items()}
