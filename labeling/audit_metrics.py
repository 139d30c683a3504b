"""Audits that decode part maps: ground-truth comparison, label-set comparison, mosaic selection.

Ground truth is either the synthetic world's ``gt.parquet`` (joined on ``key``, or on ``source`` via the
manifest) or a PA-100K ``annotation.mat`` (image file names matched to the manifest's ``source`` file
names). Part masks are pooled onto the label grid and compared with labeling.quality's definitions:
attribute mA (label-based, threshold 0.5), confusion/mIoU over all cells, foreground IoU.
Rows are streamed from DuckDB in Arrow batches; only the per-image label grids are kept.
"""

from __future__ import annotations

import io

import duckdb
import numpy as np
import pyarrow as pa

from labeling.audit_views import AuditContext, AuditResult, Finding, decode_grids, fetch_table, sql_str
from labeling.quality import (
    IGNORE_INDEX,
    attribute_mA,
    foreground_iou,
    geometry_baseline,
    gt_mask_to_grid,
    miou,
    part_confusion,
)
from pipeline.vocab import load_parts

BATCH_ROWS = 4096


def _stream(con: duckdb.DuckDBPyConnection, sql: str):
    rel = con.sql(sql)
    reader = rel.to_arrow_reader(BATCH_ROWS) if hasattr(rel, "to_arrow_reader") else rel.fetch_record_batch(BATCH_ROWS)
    yield from reader


def _worst(keys: list[str], scores: np.ndarray, k: int) -> list[tuple[str, float]]:
    order = np.argsort(scores, kind="stable")[:k]
    return [(keys[i], float(scores[i])) for i in order]


# --- label-set comparison -----------------------------------------------------------------------
def compare_labelsets(con: duckdb.DuckDBPyConnection, ctx: AuditContext, result: AuditResult) -> None:
    """Agreement of the audited label set (A) with ``--compare`` (B): per attribute, per part class, per image."""
    other = ctx.compare_meta
    common = [n for n in ctx.attributes if n in other["attributes"]]
    ia = [ctx.attributes.index(n) + 1 for n in common]
    ib = [other["attributes"].index(n) + 1 for n in common]
    result.tables["compare_keys"] = fetch_table(
        con,
        "SELECT count(*) FILTER (WHERE b.key IS NULL) AS only_in_a, "
        "count(*) FILTER (WHERE a.key IS NULL) AS only_in_b, "
        "count(*) FILTER (WHERE a.key IS NOT NULL AND b.key IS NOT NULL) AS in_both "
        "FROM (SELECT key FROM labels) a FULL OUTER JOIN (SELECT key FROM labels_b) b USING (key)",
    )
    if common:
        sql = f"""
SELECT idx, attribute, count(*) AS images, avg(((pa >= 128) = (pb >= 128))::INT) AS agreement,
       avg(abs(pa::INT - pb::INT)) / 255 AS mean_abs_diff, avg((pa >= 128)::INT) AS positive_rate_a,
       avg((pb >= 128)::INT) AS positive_rate_b
FROM (SELECT unnest({ia}) AS idx, unnest({[str(n) for n in common]}) AS attribute,
             unnest(list_select(a.attr_prob, {ia})) AS pa, unnest(list_select(b.attr_prob, {ib})) AS pb
      FROM labels a JOIN labels_b b USING (key))
GROUP BY ALL ORDER BY idx"""
        result.tables["compare_attributes"] = fetch_table(con, sql)
        result.sql["compare_attributes"] = sql
        agree = result.tables["compare_attributes"]["agreement"].to_numpy()
        result.metrics["compare_attribute_agreement"] = float(agree.mean())
        low = [r["attribute"] for r in result.tables["compare_attributes"].to_pylist() if r["agreement"] < 0.8]
        if low:
            what = f"attributes whose decision changed for > 20% of images vs {ctx.cfg.compare}"
            result.findings.append(Finding("warning", what, ", ".join(low), len(low)))
    if other["parts"] != ctx.parts or other["grid"] != ctx.grid or ctx.grid is None:
        result.findings.append(
            Finding(
                "info", "part maps not compared: the label sets differ in part vocabulary or grid", ctx.cfg.compare, 0
            )
        )
        return
    cells, k = ctx.grid[0] * ctx.grid[1], len(ctx.parts)
    conf = np.zeros((k, k), np.int64)
    keys, scores = [], []
    for batch in _stream(
        con, "SELECT a.key, a.part_map AS pa, b.part_map AS pb FROM labels a JOIN labels_b b USING (key)"
    ):
        a, b = decode_grids(batch.column(1), cells), decode_grids(batch.column(2), cells)
        conf += part_confusion(a, b, k)
        scores.append((a == b).mean(1))
        keys += batch.column(0).to_pylist()
    scores_np = np.concatenate(scores) if scores else np.zeros(0)
    iou = miou(conf)[1]
    result.tables["compare_parts"] = pa.table(
        {"id": list(range(k)), "part": ctx.parts, "iou_a_vs_b": iou, "cells_a": conf.sum(1), "cells_b": conf.sum(0)}
    )
    hist = np.histogram(scores_np, bins=20, range=(0, 1))[0]
    result.tables["compare_part_agreement_hist"] = pa.table({"agreement_lo": np.arange(20) / 20, "images": hist})
    worst = _worst(keys, scores_np, ctx.cfg.mosaic_worst)
    result.tables["compare_worst"] = pa.table({"key": [w[0] for w in worst], "cell_agreement": [w[1] for w in worst]})
    result.metrics["compare_part_cell_agreement"] = float(scores_np.mean()) if len(scores_np) else float("nan")
    result.metrics["compare_part_miou"] = float(np.nanmean(iou))
    result.findings.append(
        Finding(
            "info",
            f"vs {ctx.cfg.compare}: {result.metrics['compare_part_cell_agreement']:.1%} of part cells agree, "
            f"part mIoU {result.metrics['compare_part_miou']:.3f}",
            "compare_parts",
            len(keys),
        )
    )


# --- ground truth -------------------------------------------------------------------------------
def _decode_mask(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)))


def gt_metrics(con: duckdb.DuckDBPyConnection, ctx: AuditContext, result: AuditResult) -> None:
    """Attribute mA/precision/recall, part confusion/mIoU and foreground IoU of the labels against ground truth."""
    common = [n for n in ctx.attributes if n in ctx.gt_attributes]
    parts = ctx.gt_has_parts and ctx.grid is not None
    keys, prob, gt, pred_maps, gt_maps = _read_gt_rows(con, ctx, common, parts)
    result.metrics["gt_images"] = len(keys)
    if not keys:
        result.findings.append(
            Finding("error", "no label key matches the ground truth (wrong corpus or gt file?)", ctx.cfg.gt, 0)
        )
        return
    m_a, pred, pos = _gt_attributes(result, common, gt, prob)
    summary = [
        ("images", len(keys), "labels rows with a ground-truth row"),
        ("attribute_mA", m_a, "label-based mA, prob > 0.5, mean of (TPR+TNR)/2 over attributes"),
    ]
    worst_scores = (pred != pos).mean(1)
    worst_what = "attr_err"
    if parts:
        summary += _gt_parts(ctx, result, pred_maps, gt_maps)
        gm, pm = gt_maps, pred_maps
        valid = gm.reshape(len(gm), -1) != IGNORE_INDEX
        hit = (gm.reshape(len(gm), -1) == pm.reshape(len(pm), -1)) & valid
        worst_scores = 1 - hit.sum(1) / np.maximum(valid.sum(1), 1)
        worst_what = "cell_err"
    result.tables["gt_summary"] = pa.table(
        {
            "metric": [s[0] for s in summary],
            "value": [float(s[1]) for s in summary],
            "protocol": [s[2] for s in summary],
        }
    )
    order = np.argsort(-worst_scores, kind="stable")[: ctx.cfg.mosaic_worst]
    result.tables["gt_worst"] = pa.table({"key": [keys[i] for i in order], worst_what: worst_scores[order]})
    text = f"ground truth ({len(keys)} images): attribute mA {m_a:.3f}"
    if parts:
        text += f", part mIoU {result.metrics['part_mIoU']:.3f}, foreground IoU {result.metrics['foreground_IoU']:.3f}"
    result.findings.append(Finding("info", text, "gt_summary", len(keys)))
    n_gt = con.execute("SELECT count(*) FROM gt").fetchone()[0]
    if len(keys) < 0.5 * n_gt:
        what = f"only {len(keys)} of {n_gt} ground-truth rows have labels"
        result.findings.append(Finding("warning", what, ctx.cfg.gt, n_gt - len(keys)))


def _read_gt_rows(
    con: duckdb.DuckDBPyConnection, ctx: AuditContext, common: list[str], parts: bool
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Rows with ground truth: keys, label probabilities and gt values of the ``common`` attributes, and (with
    ``parts``) predicted and ground-truth part grids (N, gh, gw) in the label set's class ids."""
    li = np.array([ctx.attributes.index(n) for n in common], int)
    gi = np.array([ctx.gt_attributes.index(n) for n in common], int)
    cols = "l.key, l.attr_prob, g.attributes" + (", l.part_map, g.part_mask" if parts else "")
    gt_parts = list(load_parts().names)
    lut = np.array(
        [ctx.parts.index(n) if n in ctx.parts else IGNORE_INDEX for n in gt_parts] + [IGNORE_INDEX] * 256, np.uint8
    )
    keys: list[str] = []
    probs, gts, pred_maps, gt_maps = [], [], [], []
    cells = ctx.grid[0] * ctx.grid[1] if ctx.grid else 0
    for batch in _stream(con, f"SELECT {cols} FROM labels l JOIN gt g USING (key)"):
        keys += batch.column(0).to_pylist()
        n = batch.num_rows
        probs.append(np.frombuffer(_flat(batch.column(1)), np.uint8).reshape(n, -1))
        gts.append(np.frombuffer(_flat(batch.column(2)), np.uint8).reshape(n, -1))
        if parts:
            pred_maps.append(decode_grids(batch.column(3), cells))
            gt_maps.append(
                np.stack([lut[gt_mask_to_grid(_decode_mask(m), ctx.grid)] for m in batch.column(4).to_pylist()])
            )
    if not keys:
        return keys, np.zeros(0), np.zeros(0), None, None
    prob = np.concatenate(probs)[:, li].astype(np.float64) / 255
    gt = np.concatenate(gts)[:, gi]
    if not parts:
        return keys, prob, gt, None, None
    return keys, prob, gt, np.concatenate(pred_maps).reshape(-1, *ctx.grid), np.concatenate(gt_maps)


def _gt_attributes(
    result: AuditResult, common: list[str], gt: np.ndarray, prob: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """The gt_attributes table and attribute_mA; returns (mA, predicted positives, gt positives)."""
    m_a, per_attr = attribute_mA(gt, prob)
    pred = prob > 0.5
    pos = gt > 0
    tp, fp, fn = (pos & pred).sum(0), (~pos & pred).sum(0), (pos & ~pred).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        f1 = 2 * precision * recall / (precision + recall)
    result.tables["gt_attributes"] = pa.table(
        {
            "attribute": common,
            "gt_positives": pos.sum(0),
            "predicted_positives": pred.sum(0),
            "mA": per_attr,
            "precision": precision,
            "recall": recall,
            "f1": f1,
        }
    )
    result.metrics["attribute_mA"] = m_a
    return m_a, pred, pos


def _gt_parts(ctx: AuditContext, result: AuditResult, pm: np.ndarray, gm: np.ndarray) -> list[tuple]:
    """Part confusion, mIoU, foreground IoU and the two position-only baselines; returns their summary rows."""
    k = len(ctx.parts)
    conf = part_confusion(gm, pm, k)
    m_iou, iou = miou(conf)
    fg = foreground_iou(gm, pm)
    base = geometry_baseline(ctx.grid, k, part_names=ctx.parts)
    base_iou = miou(part_confusion(gm, np.broadcast_to(base, gm.shape), k))[0]
    fitted = geometry_baseline(ctx.grid, k, gt_maps=np.where(gm == IGNORE_INDEX, 0, gm))
    fitted_iou = miou(part_confusion(gm, np.broadcast_to(fitted, gm.shape), k))[0]
    result.tables["gt_parts"] = pa.table(
        {"id": list(range(k)), "part": ctx.parts, "iou": iou, "gt_cells": conf.sum(1), "pred_cells": conf.sum(0)}
    )
    gi_, pi_ = np.nonzero(np.ones((k, k), bool))
    result.tables["gt_confusion"] = pa.table(
        {
            "gt_part": [ctx.parts[i] for i in gi_],
            "pred_part": [ctx.parts[j] for j in pi_],
            "cells": conf.reshape(-1),
        }
    )
    result.metrics.update(
        part_mIoU=m_iou, foreground_IoU=fg, part_mIoU_geometry_baseline=base_iou, part_mIoU_cell_prior=fitted_iou
    )
    if m_iou <= base_iou:
        result.findings.append(
            Finding(
                "warning",
                f"part labels are no better than the fixed-position baseline (mIoU {m_iou:.3f} vs {base_iou:.3f})",
                "gt_parts",
                1,
            )
        )
    return [
        ("part_mIoU", m_iou, f"IoU per class over all {ctx.grid[0]}x{ctx.grid[1]} cells, mean over classes present"),
        ("foreground_IoU", fg, "IoU of person cells (class > 0), pooled over images"),
        ("part_mIoU_geometry_baseline", base_iou, "fixed vertical bands of a standing person (no image content)"),
        ("part_mIoU_cell_prior", fitted_iou, "most frequent ground-truth class per cell (position-only upper bound)"),
    ]


def _flat(arr: pa.Array | pa.ChunkedArray) -> pa.Buffer | np.ndarray:
    """Values of a list column of uint8 (fixed-size or not) as one contiguous array."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.uint8, copy=False)


# --- mosaics ------------------------------------------------------------------------------------
NEAR_DUPLICATE_POOL = 8  # candidates per mosaic slot


def video_of(key: str) -> str:
    """The video (or track) an image key comes from: the key without its last ``_frame`` part."""
    return key.rsplit("_", 1)[0] if "_" in key else key


def one_per_video(keys: list[str], k: int) -> list[str]:
    """The first ``k`` of ``keys`` (best first) taking one image per video; other frames fill up only if too few."""
    first, rest, seen = [], [], set()
    for key in keys:
        (rest if video_of(key) in seen else first).append(key)
        seen.add(video_of(key))
    return (first + rest)[:k]


def select_mosaics(con: duckdb.DuckDBPyConnection, ctx: AuditContext, result: AuditResult) -> dict:
    """Keys (with captions) of the images to show: per attribute most/least confident, random part maps, worst."""
    cfg = ctx.cfg
    k = cfg.mosaic_per_attribute
    sel: dict = {"attributes": [], "parts": [], "worst": [], "worst_title": ""}
    if k > 0:
        # candidates beyond k, so that near-duplicate frames of one video (LUPerson keys
        # country_city_video_frame) can give way to other videos: one image per video where possible
        pool = k * NEAR_DUPLICATE_POOL
        aggs = ", ".join(
            f"max_by(key, attr_prob[{i}], {pool}), min_by(key, attr_prob[{i}], {pool})"
            for i in range(1, len(ctx.attributes) + 1)
        )
        row = con.execute(f"SELECT {aggs} FROM labels").fetchone()
        for i, name in enumerate(ctx.attributes):
            most, least = one_per_video(row[2 * i] or [], k), one_per_video(row[2 * i + 1] or [], k)
            sel["attributes"].append({"attribute": name, "idx": i, "most": most, "least": least})
    if cfg.mosaic_parts > 0:
        sample = f"reservoir({int(cfg.mosaic_parts)} ROWS) REPEATABLE ({int(cfg.seed)})"
        sel["parts"] = [r[0] for r in con.execute(f"SELECT key FROM labels_pos USING SAMPLE {sample}").fetchall()]
    for name, title in [
        ("gt_worst", "largest disagreement with ground truth"),
        ("compare_worst", f"lowest part-map agreement with label set {cfg.compare}"),
        ("part_order_examples", "anatomically implausible part order (e.g. head below shoes)"),
    ]:
        t = result.tables.get(name)
        if t is not None and t.num_rows and "key" in t.column_names:
            cols = [c for c in t.column_names if c not in ("key", "shard", "row_idx")]
            sel["worst"] = [
                (r["key"], " ".join(f"{c}={r[c]:.3g}" if isinstance(r[c], float) else f"{c}={r[c]}" for c in cols))
                for r in t.slice(0, cfg.mosaic_worst).to_pylist()
            ]
            sel["worst_title"] = title
            break
    wanted = {key for a in sel["attributes"] for key in a["most"] + a["least"]} | set(sel["parts"])
    wanted |= {key for key, _ in sel["worst"]}
    sel["labels"] = {}
    if wanted and ctx.has_manifest:
        keys = "[" + ", ".join(sql_str(key) for key in sorted(wanted)) + "]"
        rows = con.execute(
            f'SELECT l.key, l.attr_prob, l.part_map, m.shard, m."index" FROM labels l JOIN manifest m USING (key) '
            f"WHERE l.key IN ({keys[1:-1]})"
        ).fetchall()
        sel["labels"] = {r[0]: {"attr_prob": r[1], "part_map": r[2], "shard": r[3], "index": r[4]} for r in rows}
    return sel
