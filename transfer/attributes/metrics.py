"""Pedestrian attribute metrics exactly as Rethinking_of_PAR's ``get_pedestrian_metrics`` defines them.

Label-based: for each attribute, positive recall TP / (#gt positives + eps) and negative recall
TN / (#gt negatives + eps) with eps = 1e-20, so an attribute without positives in the test set
scores 0 positive recall (its mA is half its negative recall) instead of being dropped; mA is the
mean over attributes of the average of the two recalls.

Instance-based: per image, accuracy = |gt & pred| / (|gt | pred| + eps), precision =
|gt & pred| / (|pred| + eps), recall = |gt & pred| / (|gt| + eps); an image with no predicted (or
no true) attribute contributes 0 precision (recall), an image with neither contributes 0
accuracy. Each is averaged over images; F1 is the harmonic mean of the *averaged* precision and
recall (not the mean of per-image F1s), as in the reference.

A prediction is positive when prob > threshold (strictly). Ground-truth entries other than 0/1
(e.g. RAP's "uncertain" code, which the readers already map to 0) count as neither positive
nor negative.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-20
PROTOCOL = (
    "label-based mA (mean of positive and negative recall per attribute, eps=1e-20) and instance-based "
    "accuracy/precision/recall/F1 (F1 from averaged precision and recall), threshold 0.5, "
    "as Rethinking_of_PAR get_pedestrian_metrics"
)


def attribute_metrics(gt: Any, probs: Any, threshold: float = 0.5) -> dict[str, Any]:
    """mA, accuracy, precision, recall, f1 (fractions) plus per-attribute arrays for (N, A) labels and probabilities."""
    gt = np.asarray(gt)
    probs = np.asarray(probs, dtype=np.float64)
    if gt.shape != probs.shape or gt.ndim != 2:
        raise ValueError(f"gt and probs must both be (num_images, num_attributes); got {gt.shape} and {probs.shape}")
    pred = probs > threshold
    pos = gt == 1
    neg = gt == 0

    # label-based
    gt_pos = pos.sum(axis=0).astype(float)
    gt_neg = neg.sum(axis=0).astype(float)
    true_pos = (pos & pred).sum(axis=0).astype(float)
    true_neg = (neg & ~pred).sum(axis=0).astype(float)
    false_pos = (neg & pred).sum(axis=0).astype(float)
    pos_recall = true_pos / (gt_pos + EPS)
    neg_recall = true_neg / (gt_neg + EPS)
    label_ma = (pos_recall + neg_recall) / 2
    label_prec = true_pos / (true_pos + false_pos + EPS)

    # instance-based
    inter = (pos & pred).sum(axis=1).astype(float)
    union = (pos | pred).sum(axis=1).astype(float)
    n_pred = pred.sum(axis=1).astype(float)
    n_gt = pos.sum(axis=1).astype(float)
    accuracy = float(np.mean(inter / (union + EPS)))
    precision = float(np.mean(inter / (n_pred + EPS)))
    recall = float(np.mean(inter / (n_gt + EPS)))
    f1 = 2 * precision * recall / (precision + recall + EPS)

    return {
        "mA": float(np.mean(label_ma)),
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "f1": float(f1),
        "label_mA": label_ma,
        "label_pos_recall": pos_recall,
        "label_neg_recall": neg_recall,
        "label_precision": label_prec,
    }
