"""Attribute metrics: hand-worked cases and a loop reference of Rethinking_of_PAR's definitions."""

from __future__ import annotations

import numpy as np
import pytest

from transfer.attributes.metrics import attribute_metrics

# 4 images x 3 attributes; attribute 1 has no positive; image 3 has neither gt nor predicted positives;
# probability 0.5 is exactly the threshold and therefore *not* a positive prediction.
GT = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0]])
PROBS = np.array([[0.9, 0.2, 0.4], [0.6, 0.1, 0.8], [0.5, 0.7, 0.1], [0.1, 0.1, 0.1]])
# predictions:      [1, 0, 0]        [1, 0, 1]        [0, 1, 0]        [0, 0, 0]


def test_attribute_metrics_hand_worked() -> None:
    out = attribute_metrics(GT, PROBS)
    # attr0: pos recall 1/2 (img2 at 0.5 missed), neg recall 1/2 -> 1/2
    # attr1: no positives -> pos recall 0, neg recall 3/4 -> 3/8
    # attr2: pos recall 1/2, neg recall 2/2 -> 3/4
    np.testing.assert_allclose(out["label_mA"], [1 / 2, 3 / 8, 3 / 4])
    assert out["mA"] == pytest.approx((1 / 2 + 3 / 8 + 3 / 4) / 3)
    # per image (acc, prec, rec): (1/2, 1, 1/2), (1/2, 1/2, 1), (0, 0, 0), empty/empty -> (0, 0, 0)
    assert out["accuracy"] == pytest.approx(1 / 4)
    assert out["precision"] == pytest.approx(3 / 8)
    assert out["recall"] == pytest.approx(3 / 8)
    assert out["f1"] == pytest.approx(3 / 8)  # 2PR/(P+R) of the averaged P and R


def test_f1_is_from_averaged_precision_and_recall() -> None:
    gt = np.array([[1, 1], [1, 0]])
    probs = np.array([[0.9, 0.1], [0.9, 0.9]])
    out = attribute_metrics(gt, probs)
    # per image P/R: (1, 1/2), (1/2, 1) -> mean P = mean R = 3/4 -> F1 = 3/4 (mean of per-image F1 would be 2/3)
    assert out["f1"] == pytest.approx(0.75)


def test_threshold_is_strict_and_configurable() -> None:
    gt = np.array([[1], [0]])
    assert attribute_metrics(gt, np.array([[0.5], [0.2]]))["mA"] == pytest.approx(0.5)
    assert attribute_metrics(gt, np.array([[0.5], [0.2]]), threshold=0.4)["mA"] == pytest.approx(1.0)


def test_unknown_gt_codes_count_as_neither() -> None:
    gt = np.array([[1, 2], [0, -1]])
    out = attribute_metrics(gt, np.array([[0.9, 0.9], [0.1, 0.1]]))
    np.testing.assert_allclose(out["label_pos_recall"], [1.0, 0.0])
    np.testing.assert_allclose(out["label_neg_recall"], [1.0, 0.0])


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="num_images"):
        attribute_metrics(np.zeros((2, 3)), np.zeros((2, 4)))


def _reference(gt, probs, threshold=0.5, eps=1e-20):
    n, a = gt.shape
    pred = [[1 if probs[i][j] > threshold else 0 for j in range(a)] for i in range(n)]
    label_ma = []
    for j in range(a):
        tp = sum(1 for i in range(n) if gt[i][j] == 1 and pred[i][j] == 1)
        tn = sum(1 for i in range(n) if gt[i][j] == 0 and pred[i][j] == 0)
        p = sum(1 for i in range(n) if gt[i][j] == 1)
        q = sum(1 for i in range(n) if gt[i][j] == 0)
        label_ma.append((tp / (p + eps) + tn / (q + eps)) / 2)
    accs, precs, recs = [], [], []
    for i in range(n):
        g = {j for j in range(a) if gt[i][j] == 1}
        s = {j for j in range(a) if pred[i][j] == 1}
        accs.append(len(g & s) / (len(g | s) + eps))
        precs.append(len(g & s) / (len(s) + eps))
        recs.append(len(g & s) / (len(g) + eps))
    prec, rec = sum(precs) / n, sum(recs) / n
    return sum(label_ma) / a, sum(accs) / n, prec, rec, 2 * prec * rec / (prec + rec + eps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attribute_metrics_match_loop_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gt = (rng.random((40, 7)) < 0.3).astype(int)
    gt[:, 3] = 0  # an attribute without positives
    probs = rng.choice([0.1, 0.5, 0.7, 0.95], size=gt.shape)  # includes exact-threshold values
    probs[:5] = 0.0  # images with empty predictions
    out = attribute_metrics(gt, probs)
    ma, acc, prec, rec, f1 = _reference(gt, probs)
    assert out["mA"] == pytest.approx(ma, abs=1e-12)
    assert out["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert out["precision"] == pytest.approx(prec, abs=1e-12)
    assert out["recall"] == pytest.approx(rec, abs=1e-12)
    assert out["f1"] == pytest.approx(f1, abs=1e-12)
