"""CityPersons log-average miss rate (MR^-2), identical to the official evaluation.

Protocol: cvgroup-njust/CityPersons ``evaluation/eval_script/eval_MR_multisetup.py`` (a fork of Piotr
Dollár's COCO/Caltech evaluation) with its ``coco.py`` ``loadRes``. Every published CityPersons number
(SOLIDER's and CLASP's heavy-occlusion MR^-2 included) comes from that script, so this module reproduces
it step for step, quirks included, without its code:

* Only category 1 is scored (``catIds = [1]`` is hard-wired in its ``accumulate``); ground truth and
  detections of other categories take no part, not even as ignore regions.
* Setups (ground-truth height in px, visible ratio; both bounds inclusive):
  ``Reasonable`` [50, 1e10] x [0.65, 1e10], ``Reasonable_small`` [50, 75] x [0.65, 1e10],
  ``Reasonable_occ=heavy`` [50, 1e10] x [0.2, 0.65], ``All`` [20, 1e10] x [0.2, 1e10].
  A ground truth outside the setup, or with ``ignore`` set, becomes an ignore region.
* Detections: per image, stable-sorted by descending score, the first 1000 kept, then only those with
  ``lo / 1.25 <= bbox_h < hi * 1.25`` (height = ``bbox[3]``, set by ``loadRes``, overriding any
  ``height`` key).
* Matching per image, detections in score order, threshold 0.5 *inclusive*: a detection takes the
  not-yet-matched regular ground truth with the highest IoU (ties: the later one in file order);
  failing that, if any ignore region covers it with IoA = inter / detection area >= 0.5, the detection
  is dropped. Ignore regions can absorb any number of detections. Boxes are [x, y, w, h], no +1.
* A detection matched to a regular ground truth whose ``id`` is 0 counts as a false positive (the script
  tests the stored match id for truthiness).
* Curve: all kept detections of all images, stable-sorted by descending score (image order breaks
  ties); FPPI = cumulative FP / number of images in ``gt["images"]`` (with or without people); recall =
  cumulative TP / number of regular ground truths. At each FPPI reference
  ``[0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.0000]`` (the script's rounded
  constants, not ``10**linspace(-2, 0, 9)``) the recall is that of the last detection with
  FPPI <= reference; beyond the last detection it stays at the final recall.
  Quirk: if even the first detection has FPPI above a reference, the script indexes position -1 and so
  takes the *final* recall there. This needs fewer than 100 images (an FP on top means FPPI = 1/images
  > 0.01), so it never happens on the 500-image validation set; it is reproduced anyway.
  No kept detection at all gives recall 0 at every reference.
* MR^-2 = exp(mean(log(1 - recall))) over the nine references, with *no* epsilon: a miss rate of 0 at
  any reference makes the result exactly 0.

Returned as a fraction (the script prints it x100). Where the script prints -1 (no regular ground
truth in the setup) this module returns NaN, so it cannot be averaged in by mistake.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ClaspError
from pipeline.formats import load_json_input

PERSON_CATEGORY_ID = 1
IOU_THRESHOLD = 0.5
MAX_DETS_PER_IMAGE = 1000
HEIGHT_MARGIN = 1.25  # "expFilter": detections may be 25% outside the setup's height range
FPPI_REFERENCES = np.array([0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.0000])
_UNBOUNDED = 1e5**2


@dataclass(frozen=True)
class CityPersonsSetup:
    """Ground-truth ranges of one evaluation setup (inclusive bounds)."""

    height_px: tuple[float, float]
    visibility: tuple[float, float]


SETUPS: dict[str, CityPersonsSetup] = {
    "Reasonable": CityPersonsSetup((50, _UNBOUNDED), (0.65, _UNBOUNDED)),
    "Reasonable_small": CityPersonsSetup((50, 75), (0.65, _UNBOUNDED)),
    "Reasonable_occ=heavy": CityPersonsSetup((50, _UNBOUNDED), (0.2, 0.65)),
    "All": CityPersonsSetup((20, _UNBOUNDED), (0.2, _UNBOUNDED)),
}


@dataclass
class _ImageGt:
    boxes: np.ndarray  # (G, 4) xywh float64, file order
    ids: np.ndarray  # (G,)
    height: np.ndarray
    vis_ratio: np.ndarray
    ignore: np.ndarray  # (G,) bool, the file's own flag


@dataclass
class _ImageDt:
    boxes: np.ndarray  # (D, 4) xywh float64, results order
    scores: np.ndarray  # (D,)


@dataclass
class _Prepared:
    image_ids: list[Any]  # sorted unique ids of gt["images"]
    gts: dict[Any, _ImageGt]  # category-1 ground truth per image
    dts: dict[Any, _ImageDt]  # category-1 detections per image


def citypersons_miss_rate(
    gt: Mapping[str, Any] | str | Path, detections: Sequence[Mapping[str, Any]] | str | Path, setup: str
) -> float:
    """MR^-2 (fraction, lower is better) of ``detections`` on ``gt`` under one official setup.

    ``gt``: the CityPersons COCO-style dict (or its JSON path) with ``images``, ``categories`` and
    ``annotations`` carrying ``id, image_id, category_id, bbox [x,y,w,h], height, vis_ratio`` and
    optionally ``ignore``. ``detections``: ``{image_id, category_id, bbox, score}`` dicts (or a JSON
    path). ``setup``: one of :data:`SETUPS`. The protocol is in the module docstring.
    """
    return _log_average(citypersons_recall_at_fppi(gt, detections, setup))


def citypersons_all_setups(
    gt: Mapping[str, Any] | str | Path, detections: Sequence[Mapping[str, Any]] | str | Path
) -> dict[str, float]:
    """MR^-2 for every setup of :data:`SETUPS`, in the script's order, parsing the inputs once."""
    prepared = _prepare(gt, detections)
    return {name: _log_average(_recall_at_fppi(prepared, SETUPS[name])) for name in SETUPS}


def citypersons_recall_at_fppi(
    gt: Mapping[str, Any] | str | Path, detections: Sequence[Mapping[str, Any]] | str | Path, setup: str
) -> np.ndarray:
    """Recall at each of :data:`FPPI_REFERENCES` (miss rate = 1 - recall); all -1 if the setup has no
    regular ground truth. Useful for plotting and for checking a number by hand."""
    if setup not in SETUPS:
        raise ClaspError(f"unknown CityPersons setup {setup!r}; choose one of {', '.join(SETUPS)}")
    return _recall_at_fppi(_prepare(gt, detections), SETUPS[setup])


# ---------------------------------------------------------------------------------------------- parsing


def _prepare(gt_source: Any, dt_source: Any) -> _Prepared:
    gt = load_json_input(gt_source, "CityPersons ground-truth")
    dets = load_json_input(dt_source, "detections")
    if not isinstance(gt, Mapping) or "images" not in gt or "annotations" not in gt:
        raise ClaspError("CityPersons ground truth must be a COCO-style dict with 'images' and 'annotations'")
    category_ids = {c.get("id") for c in gt.get("categories", [])}
    if PERSON_CATEGORY_ID not in category_ids:
        raise ClaspError(
            f"CityPersons ground truth has no category with id {PERSON_CATEGORY_ID} in 'categories' "
            f"(found {sorted(category_ids, key=str)}); the official evaluation scores category 1 only"
        )
    image_ids = sorted({img["id"] for img in gt["images"]})
    known = set(image_ids)

    per_image: dict[Any, list[Mapping[str, Any]]] = {}
    seen_ids: set[Any] = set()
    for n, ann in enumerate(gt["annotations"]):
        if ann.get("id") in seen_ids:
            raise ClaspError(f"ground-truth annotation #{n} repeats id {ann.get('id')!r}; ids must be unique")
        seen_ids.add(ann.get("id"))
        if ann.get("category_id") != PERSON_CATEGORY_ID:
            continue
        missing = [k for k in ("id", "image_id", "bbox", "height", "vis_ratio") if k not in ann]
        if missing:
            raise ClaspError(f"ground-truth annotation #{n} lacks {', '.join(missing)} (CityPersons format)")
        if ann.get("ignore", 0) not in (0, 1, False, True):
            raise ClaspError(f"ground-truth annotation #{n} has ignore={ann['ignore']!r}; expected 0 or 1")
        if ann["image_id"] in known:
            per_image.setdefault(ann["image_id"], []).append(ann)
    gts = {
        image_id: _ImageGt(
            boxes=_boxes([a["bbox"] for a in anns], f"ground truth of image {image_id!r}"),
            ids=np.array([a["id"] for a in anns], dtype=object),
            height=np.array([a["height"] for a in anns], dtype=np.float64),
            vis_ratio=np.array([a["vis_ratio"] for a in anns], dtype=np.float64),
            ignore=np.array([bool(a.get("ignore", 0)) for a in anns], dtype=bool),
        )
        for image_id, anns in per_image.items()
    }

    if not isinstance(dets, Sequence) or isinstance(dets, str | bytes):
        raise ClaspError("detections must be a list of {image_id, category_id, bbox, score} dicts")
    dt_lists: dict[Any, tuple[list[Any], list[float]]] = {}
    for n, det in enumerate(dets):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in det]
        if missing:
            raise ClaspError(f"detection #{n} lacks {', '.join(missing)}")
        if det["image_id"] not in known:
            raise ClaspError(f"detection #{n} refers to image_id {det['image_id']!r}, which is not in gt['images']")
        if det["category_id"] == PERSON_CATEGORY_ID:
            boxes, scores = dt_lists.setdefault(det["image_id"], ([], []))
            boxes.append(det["bbox"])
            scores.append(det["score"])
    dts = {
        image_id: _ImageDt(_boxes(boxes, f"detections of image {image_id!r}"), np.asarray(scores, dtype=np.float64))
        for image_id, (boxes, scores) in dt_lists.items()
    }
    return _Prepared(image_ids=image_ids, gts=gts, dts=dts)


def _boxes(rows: list[Any], what: str) -> np.ndarray:
    try:
        boxes = np.asarray(rows, dtype=np.float64).reshape(-1, 4) if rows else np.zeros((0, 4))
    except (TypeError, ValueError):
        boxes = np.zeros((0, 4))
    if len(boxes) != len(rows) or not np.isfinite(boxes).all():
        raise ClaspError(f"{what}: every bbox must be 4 finite numbers [x, y, w, h]")
    return boxes


# ------------------------------------------------------------------------------------------- evaluation


def _overlaps(dt: np.ndarray, gt: np.ndarray, gt_is_region: np.ndarray) -> np.ndarray:
    """(D, G): IoU with regular ground truth, IoA (inter / detection area) with ignore regions."""
    dx1, dy1 = dt[:, 0:1], dt[:, 1:2]
    dx2, dy2 = dx1 + dt[:, 2:3], dy1 + dt[:, 3:4]
    gx1, gy1 = gt[:, 0], gt[:, 1]
    gx2, gy2 = gx1 + gt[:, 2], gy1 + gt[:, 3]
    inter_w = np.minimum(dx2, gx2) - np.maximum(dx1, gx1)
    inter_h = np.minimum(dy2, gy2) - np.maximum(dy1, gy1)
    overlap = (inter_w > 0) & (inter_h > 0)
    inter = np.where(overlap, inter_w * inter_h, 0.0)
    dt_area = dt[:, 2:3] * dt[:, 3:4]
    union = np.where(gt_is_region, dt_area, dt_area + gt[:, 2] * gt[:, 3] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(overlap, inter / union, 0.0)


def _match_image(gt: _ImageGt | None, dt: _ImageDt | None, setup: CityPersonsSetup) -> tuple[int, list]:
    """Returns (number of regular gt, [(score, is_tp, is_dropped)] per kept detection, score order)."""
    if gt is not None:
        (h_lo, h_hi), (v_lo, v_hi) = setup.height_px, setup.visibility
        out_of_setup = (gt.height < h_lo) | (gt.height > h_hi) | (gt.vis_ratio < v_lo) | (gt.vis_ratio > v_hi)
        is_region = gt.ignore | out_of_setup
        # Regular ground truth first, ignore regions last, each in file order (stable sort).
        order = np.argsort(is_region, kind="mergesort")
        gt_boxes, gt_ids, is_region = gt.boxes[order], gt.ids[order], is_region[order]
    else:
        gt_boxes, gt_ids, is_region = np.zeros((0, 4)), np.zeros(0, dtype=object), np.zeros(0, dtype=bool)
    n_regular = int((~is_region).sum())
    if dt is None:
        return n_regular, []

    order = np.argsort(-dt.scores, kind="mergesort")[:MAX_DETS_PER_IMAGE]
    boxes, scores = dt.boxes[order], dt.scores[order]
    lo, hi = setup.height_px
    keep = (boxes[:, 3] >= lo / HEIGHT_MARGIN) & (boxes[:, 3] < hi * HEIGHT_MARGIN)
    boxes, scores = boxes[keep], scores[keep]

    overlaps = _overlaps(boxes, gt_boxes, is_region)
    taken = np.zeros(len(gt_boxes), dtype=bool)
    results = []
    for d in range(len(boxes)):
        row = overlaps[d]
        candidates = ~is_region & ~taken & (row >= IOU_THRESHOLD)
        if candidates.any():
            best = row[candidates].max()
            g = int(np.flatnonzero(candidates & (row == best))[-1])
            taken[g] = True
            results.append((scores[d], bool(gt_ids[g] != 0), False))
        else:
            dropped = bool((is_region & (row >= IOU_THRESHOLD)).any())
            results.append((scores[d], False, dropped))
    return n_regular, results


def _recall_at_fppi(prepared: _Prepared, setup: CityPersonsSetup) -> np.ndarray:
    n_regular_total = 0
    scores, tps, dropped = [], [], []
    for image_id in prepared.image_ids:
        gt, dt = prepared.gts.get(image_id), prepared.dts.get(image_id)
        if gt is None and dt is None:
            continue
        n_regular, results = _match_image(gt, dt, setup)
        n_regular_total += n_regular
        for score, is_tp, is_dropped in results:
            scores.append(score)
            tps.append(is_tp)
            dropped.append(is_dropped)
    if n_regular_total == 0:
        return -np.ones(len(FPPI_REFERENCES))

    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    kept = order[~np.asarray(dropped, dtype=bool)[order]] if order.size else order
    is_tp = np.asarray(tps, dtype=bool)[kept] if kept.size else np.zeros(0, dtype=bool)
    if is_tp.size == 0:
        return np.zeros(len(FPPI_REFERENCES))
    tp = np.cumsum(is_tp).astype(np.float64)
    fp = np.cumsum(~is_tp).astype(np.float64)
    fppi = fp / len(prepared.image_ids)
    recall = tp / n_regular_total
    last = np.searchsorted(fppi, FPPI_REFERENCES, side="right") - 1
    # Index -1 (no detection at or below that FPPI) wraps to the final recall, as in the script.
    return recall[last]


def _log_average(recall: np.ndarray) -> float:
    miss_rate = 1 - recall
    valid = miss_rate[miss_rate < 2]
    if valid.size == 0:
        return math.nan
    with np.errstate(divide="ignore"):
        return float(np.exp(np.mean(np.log(valid))))
