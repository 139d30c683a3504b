"""Pseudo-label quality against ground truth (the synthetic world, or any annotated set).

Protocols, stated so every number can carry its definition:

- ``attribute_mA``: label-based mean accuracy of pedestrian attribute recognition (PA-100K/PETA/RAP):
  mA = 1/M * sum_i (TP_i/P_i + TN_i/N_i) / 2 over the M attributes, predictions = prob > threshold.
  As in the field's reference code, an attribute with no positives (or no negatives) in the
  ground truth contributes 0 for that half (TP/(P+eps)); pass ``skip_undefined=True`` to
  average only attributes with both positives and negatives instead.
- ``part_confusion`` / ``miou``: a ``num_classes`` x ``num_classes`` confusion matrix (rows =
  ground truth, columns = prediction) accumulated over all cells; IoU_c = TP/(TP+FP+FN); mIoU
  is the mean over classes that occur in ground truth or prediction (LIP/CIHP style), background
  (class 0) included.
- ``foreground_iou``: IoU of the person masks (class > 0) of ground truth and prediction.
- ``gt_mask_to_grid``: a pixel mask is compared at the label grid by taking the majority class
  of the pixels in each grid cell (cell edges at round(i * H / grid_h)).
- ``geometry_baseline``: what position alone predicts. Without ground truth it assigns fixed
  vertical bands (head, upper clothes, lower clothes, legs, shoes) to the central columns and
  background to the side columns; with ``gt_maps`` it is the per-cell most frequent ground-truth
  class (the strongest predictor that sees only the cell position).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = 255
_EPS = 1e-20

# Fixed vertical layout of a standing pedestrian crop: (class name, top, bottom) as fractions of the height.
_VERTICAL_BANDS = (
    ("head", 0.00, 0.14),
    ("upper_clothes", 0.14, 0.48),
    ("lower_clothes", 0.48, 0.80),
    ("legs", 0.80, 0.92),
    ("shoes", 0.92, 1.00),
)
_DEFAULT_PART_NAMES = (
    "background",
    "head",
    "face",
    "upper_clothes",
    "arms",
    "lower_clothes",
    "legs",
    "shoes",
    "accessories",
)


def attribute_mA(
    gt: np.ndarray, prob: np.ndarray, threshold: float = 0.5, *, skip_undefined: bool = False
) -> tuple[float, np.ndarray]:
    """Label-based mA of ``prob`` (N, A) against binary ``gt`` (N, A); returns (mA, per-attribute accuracy)."""
    gt = np.asarray(gt)
    prob = np.asarray(prob, dtype=np.float64)
    if gt.shape != prob.shape or gt.ndim != 2:
        raise ValueError(f"attribute_mA: gt {gt.shape} and prob {prob.shape} must both be (N, A)")
    gt_pos = gt > 0.5
    pred_pos = prob > threshold
    pos = gt_pos.sum(0)
    neg = (~gt_pos).sum(0)
    tp = (gt_pos & pred_pos).sum(0)
    tn = (~gt_pos & ~pred_pos).sum(0)
    per_attr = (tp / (pos + _EPS) + tn / (neg + _EPS)) / 2.0
    if skip_undefined:
        defined = (pos > 0) & (neg > 0)
        per_attr = np.where(defined, per_attr, np.nan)
        return float(np.nanmean(per_attr)) if defined.any() else float("nan"), per_attr
    return float(per_attr.mean()), per_attr


def part_confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix (rows = ground truth, cols = prediction); gt cells of IGNORE_INDEX are skipped."""
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    if gt.shape != pred.shape:
        raise ValueError(f"part_confusion: gt has {gt.size} cells but pred has {pred.size}")
    keep = (gt >= 0) & (gt < num_classes)
    if np.any((pred[keep] < 0) | (pred[keep] >= num_classes)):
        raise ValueError(f"part_confusion: prediction holds class ids outside 0..{num_classes - 1}")
    flat = gt[keep] * num_classes + pred[keep]
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou(confusion: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean IoU over classes present in ground truth or prediction; per-class IoU (NaN where absent)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, _EPS), np.nan)
    return (float(np.nanmean(iou)) if np.any(union > 0) else float("nan")), iou


def foreground_iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """IoU of person (class > 0) cells; cells of IGNORE_INDEX in ``gt`` are skipped."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"foreground_iou: gt {gt.shape} and pred {pred.shape} differ")
    keep = gt != IGNORE_INDEX
    g = (gt > 0) & keep
    p = (pred > 0) & keep
    union = np.logical_or(g, p).sum()
    return float(np.logical_and(g, p).sum() / union) if union else float("nan")


def _cell_edges(size: int, cells: int) -> np.ndarray:
    return np.round(np.arange(cells + 1) * size / cells).astype(np.int64)


def gt_mask_to_grid(mask: np.ndarray, grid_hw: Sequence[int]) -> np.ndarray:
    """Majority class per grid cell of a pixel mask (H, W) or a batch (N, H, W); ties go to the lower id."""
    mask = np.asarray(mask)
    squeeze = mask.ndim == 2
    if squeeze:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"gt_mask_to_grid: expected (H, W) or (N, H, W), got shape {mask.shape}")
    n, h, w = mask.shape
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    if gh > h or gw > w:
        raise ValueError(f"gt_mask_to_grid: grid {gh}x{gw} is finer than the mask {h}x{w}")
    row_cell = np.searchsorted(_cell_edges(h, gh), np.arange(h), side="right") - 1
    col_cell = np.searchsorted(_cell_edges(w, gw), np.arange(w), side="right") - 1
    cell = (row_cell[:, None] * gw + col_cell[None, :]).reshape(-1)
    k = int(mask.max()) + 1 if mask.size else 1
    flat = (np.arange(n)[:, None] * (gh * gw) + cell[None, :]) * k + mask.reshape(n, -1).astype(np.int64)
    counts = np.bincount(flat.reshape(-1), minlength=n * gh * gw * k).reshape(n, gh, gw, k)
    grid = counts.argmax(-1).astype(np.uint8)
    return grid[0] if squeeze else grid


def geometry_baseline(
    grid_hw: Sequence[int],
    num_classes: int,
    *,
    part_names: Sequence[str] | None = None,
    gt_maps: np.ndarray | None = None,
    person_width: float = 0.6,
) -> np.ndarray:
    """A (grid_h, grid_w) part map predicted from cell position alone.

    With ``gt_maps`` (N, grid_h, grid_w): the most frequent ground-truth class of each cell.
    Otherwise fixed vertical bands of ``part_names`` (default: data_manifests/parts.yaml order)
    over the central ``person_width`` of the columns, background elsewhere.
    """
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    if gt_maps is not None:
        gt_maps = np.asarray(gt_maps).astype(np.int64)
        if gt_maps.shape[1:] != (gh, gw):
            raise ValueError(f"geometry_baseline: gt_maps cells {gt_maps.shape[1:]} differ from grid {(gh, gw)}")
        valid = (gt_maps >= 0) & (gt_maps < num_classes)
        onehot = np.zeros((gh, gw, num_classes), dtype=np.int64)
        for c in range(num_classes):
            onehot[..., c] = ((gt_maps == c) & valid).sum(0)
        return onehot.argmax(-1).astype(np.uint8)
    names = list(part_names) if part_names is not None else list(_DEFAULT_PART_NAMES[:num_classes])
    if len(names) != num_classes:
        raise ValueError(f"geometry_baseline: {len(names)} part names for {num_classes} classes")
    out = np.zeros((gh, gw), dtype=np.uint8)
    centres = (np.arange(gh) + 0.5) / gh
    for name, top, bottom in _VERTICAL_BANDS:
        if name in names:
            out[(centres >= top) & (centres < bottom), :] = names.index(name)
    col_centres = (np.arange(gw) + 0.5) / gw
    out[:, np.abs(col_centres - 0.5) > person_width / 2] = 0
    return out
