"""COCO keypoint AP/AR through pycocotools' OKS evaluation (the reference, used as is).

Protocol (pycocotools ``COCOeval(iouType="keypoints")``, what every COCO pose number uses):
OKS = mean over the ground truth's labelled keypoints (v > 0) of exp(-d^2 / (2 * area * (2*sigma)^2)),
with ``area`` the ground truth's segment area and the per-joint sigmas below; ground truth with
``num_keypoints == 0`` or ``iscrowd`` is ignored; at most 20 detections per image; AP averaged over OKS
thresholds 0.50:0.05:0.95 and 101 recall points; medium / large = area in [32^2, 96^2] / above.
Images are all ``gt["images"]`` (those without people count through false positives only), and an image
without any result simply contributes misses. Numbers are fractions (papers print x100).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ClaspError
from pipeline.formats import load_json_input

COCO_KEYPOINT_NAMES = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
# Per-joint OKS falloff (pycocotools Params.kpt_oks_sigmas), in COCO_KEYPOINT_NAMES order.
COCO_KEYPOINT_SIGMAS = (
    np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89])
    / 10.0
)
# COCOeval.summarize() order for keypoints.
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def coco_keypoint_ap(
    gt: Mapping[str, Any] | str | Path,
    results: Sequence[Mapping[str, Any]] | str | Path,
    *,
    sigmas: Sequence[float] | np.ndarray | None = None,
) -> dict[str, float]:
    """AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl of keypoint ``results`` on COCO-format ``gt``.

    ``gt``: a COCO person-keypoints dict or JSON path. ``results``: ``{image_id, category_id, keypoints
    [x1, y1, v1, ...], score}`` dicts or a JSON path (an empty list scores 0). ``sigmas``: per-joint
    OKS sigmas when the skeleton is not COCO's 17 joints. Inputs are not modified.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict = load_json_input(gt, "COCO keypoint ground-truth")
    results_list = load_json_input(results, "keypoint results")
    sigma_array = np.asarray(COCO_KEYPOINT_SIGMAS if sigmas is None else sigmas, dtype=np.float64)
    _validate(gt_dict, results_list, len(sigma_array))

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(dict(gt_dict))
        coco_gt.createIndex()
        if results_list:
            coco_dt = coco_gt.loadRes(copy.deepcopy(list(results_list)))
        else:
            # loadRes cannot take an empty list; an empty result set is a valid (all-miss) submission.
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(coco_gt.dataset["images"]),
                "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
                "annotations": [],
            }
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="keypoints")
        evaluator.params.kpt_oks_sigmas = sigma_array
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(KEYPOINT_STAT_NAMES, evaluator.stats, strict=True)}


def keypoint_oks(
    gt_keypoints: Sequence[float] | np.ndarray,
    gt_area: float,
    gt_bbox: Sequence[float],
    dt_keypoints: Sequence[Sequence[float]] | np.ndarray,
    *,
    sigmas: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """OKS of each detection (rows of ``dt_keypoints``, flat ``[x, y, v] * K``) with one ground truth.

    Same arithmetic as ``COCOeval.computeOks``: distances over the gt's labelled joints; if it has none,
    the distance of each predicted joint to the gt box enlarged by its own size on every side.
    """
    sigma_array = np.asarray(COCO_KEYPOINT_SIGMAS if sigmas is None else sigmas, dtype=np.float64)
    variances = (sigma_array * 2) ** 2
    g = np.asarray(gt_keypoints, dtype=np.float64)
    d = np.atleast_2d(np.asarray(dt_keypoints, dtype=np.float64))
    if g.size != 3 * len(sigma_array) or d.shape[1] != g.size:
        raise ClaspError(f"keypoints must be flat [x, y, v] * {len(sigma_array)}; got {g.size} and {d.shape[1]}")
    xg, yg, vg = g[0::3], g[1::3], g[2::3]
    xd, yd = d[:, 0::3], d[:, 1::3]
    labelled = vg > 0
    if labelled.any():
        dx, dy = xd - xg, yd - yg
    else:
        x0, x1 = gt_bbox[0] - gt_bbox[2], gt_bbox[0] + gt_bbox[2] * 2
        y0, y1 = gt_bbox[1] - gt_bbox[3], gt_bbox[1] + gt_bbox[3] * 2
        dx = np.maximum(0, x0 - xd) + np.maximum(0, xd - x1)
        dy = np.maximum(0, y0 - yd) + np.maximum(0, yd - y1)
    e = (dx**2 + dy**2) / variances / (gt_area + np.spacing(1)) / 2
    if labelled.any():
        e = e[:, labelled]
    # Row by row on purpose: a 2-D reduction may sum in another order and differ from COCOeval in the last bit.
    return np.array([np.sum(np.exp(-row)) / row.shape[0] for row in e])


def _validate(gt: Any, results: Any, n_joints: int) -> None:
    if not isinstance(gt, Mapping) or not {"images", "annotations", "categories"} <= set(gt):
        raise ClaspError("COCO keypoint ground truth must be a dict with 'images', 'annotations', 'categories'")
    for n, ann in enumerate(gt["annotations"]):
        missing = [
            k for k in ("id", "image_id", "category_id", "keypoints", "num_keypoints", "area", "bbox") if k not in ann
        ]
        if missing:
            raise ClaspError(f"ground-truth annotation #{n} lacks {', '.join(missing)} (COCO person-keypoints format)")
        if len(ann["keypoints"]) != 3 * n_joints:
            raise ClaspError(
                f"ground-truth annotation #{n} has {len(ann['keypoints'])} keypoint values, not {3 * n_joints}"
            )
    if not isinstance(results, Sequence) or isinstance(results, str | bytes):
        raise ClaspError("keypoint results must be a list of {image_id, category_id, keypoints, score} dicts")
    image_ids = {img["id"] for img in gt["images"]}
    for n, res in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "keypoints", "score") if k not in res]
        if missing:
            raise ClaspError(f"keypoint result #{n} lacks {', '.join(missing)}")
        if res["image_id"] not in image_ids:
            raise ClaspError(f"keypoint result #{n} refers to image_id {res['image_id']!r}, not in gt['images']")
        if len(res["keypoints"]) != 3 * n_joints:
            raise ClaspError(f"keypoint result #{n} has {len(res['keypoints'])} keypoint values, not {3 * n_joints}")
