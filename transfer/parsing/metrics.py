"""Human parsing scores (LIP / CIHP): confusion matrix, mIoU, pixel and mean accuracy.

Protocol (CE2P / SCHP ``utils/miou.py``, also used by SOLIDER's parsing code): predictions are compared
with the ground-truth label PNG at its original resolution; pixels labelled ``ignore_index`` (255) are
left out; one confusion matrix (rows = ground truth, columns = prediction) is summed over the whole set,
then, per class c with tp = C[c, c], pos = row sum, res = column sum:

* IoU_c = tp / max(1, pos + res - tp); mIoU = mean over *all* classes, so a class absent from both ground
  truth and predictions counts as IoU 0 (LIP's 20 classes all occur in its validation set);
* pixel accuracy = sum(tp) / sum(pos); mean accuracy = mean over classes of tp / max(1, pos).

Fractions here (the reference prints x100). Unlike the reference, labels outside [0, num_classes) other
than ``ignore_index`` are an error instead of being folded into a wrong cell or silently dropped.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import ClaspError

LIP_CLASSES = (
    "Background",
    "Hat",
    "Hair",
    "Glove",
    "Sunglasses",
    "Upper-clothes",
    "Dress",
    "Coat",
    "Socks",
    "Pants",
    "Jumpsuits",
    "Scarf",
    "Skirt",
    "Face",
    "Left-arm",
    "Right-arm",
    "Left-leg",
    "Right-leg",
    "Left-shoe",
    "Right-shoe",
)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction; add them up
    over images. ``gt`` and ``pred`` are label maps of the same shape (prediction at the gt's size)."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ClaspError(f"parsing prediction shape {pred.shape} differs from ground truth {gt.shape}; resize first")
    valid = gt != ignore_index
    gt_valid = gt[valid].astype(np.int64)
    pred_valid = pred[valid].astype(np.int64)
    for name, labels in (("ground truth", gt_valid), ("prediction", pred_valid)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ClaspError(
                f"parsing {name} holds label {labels.min() if labels.min() < 0 else labels.max()} outside "
                f"0..{num_classes - 1} (ignore_index={ignore_index})"
            )
    counts = np.bincount(gt_valid * num_classes + pred_valid, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def parsing_scores(conf: np.ndarray) -> dict[str, float | list[float]]:
    """``{mIoU, pixel_acc, mean_acc, per_class_iou}`` from a summed confusion matrix (LIP/CIHP definitions)."""
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ClaspError(f"a confusion matrix must be square, got shape {conf.shape}")
    pos = conf.sum(1)
    res = conf.sum(0)
    tp = np.diag(conf)
    if pos.sum() == 0:
        raise ClaspError("the confusion matrix is empty: no labelled pixels were evaluated")
    iou = tp / np.maximum(1.0, pos + res - tp)
    return {
        "mIoU": float(iou.mean()),
        "pixel_acc": float(tp.sum() / pos.sum()),
        "mean_acc": float((tp / np.maximum(1.0, pos)).mean()),
        "per_class_iou": [float(v) for v in iou],
    }
