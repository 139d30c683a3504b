"""Re-ID metrics: hand-worked Market-protocol cases, a loop reference, and k-reciprocal re-ranking."""

from __future__ import annotations

import numpy as np
import pytest

from transfer.reid.metrics import evaluate_rank, pairwise_distance
from transfer.reid.rerank import k_reciprocal_rerank

# --- evaluate_rank: hand-worked case ------------------------------------------------------------
#
# gallery:      g0        g1        g2        g3            g4
# (pid, cam):   (1, 0)    (2, 1)    (1, 1)    (0, 1) distr. (1, 2)
G_PIDS = np.array([1, 2, 1, 0, 1])
G_CAMS = np.array([0, 1, 1, 1, 2])
Q_PIDS = np.array([1, 3, 2, 2, 1])
Q_CAMS = np.array([0, 0, 1, 0, 2])
DIST = np.array(
    [
        # q0 (1, cam0): g0 same id+cam -> removed; kept order g1 x, g2 HIT@2, g3 x, g4 HIT@4
        [0.1, 0.2, 0.3, 0.4, 0.5],
        # q1 (3, cam0): identity not in gallery -> skipped
        [0.1, 0.2, 0.3, 0.4, 0.5],
        # q2 (2, cam1): only same-id gallery image (g1) is same camera -> skipped
        [0.1, 0.2, 0.3, 0.4, 0.5],
        # q3 (2, cam0): tie g0 = g1 = 0.5; stable order puts g0 (miss) first, so the hit is rank 2
        [0.5, 0.5, 0.9, 0.9, 0.9],
        # q4 (1, cam2): g4 same id+cam -> removed; kept g0 HIT@1, g2 HIT@2, g3 x, g1 x
        [0.1, 0.9, 0.2, 0.3, 0.0],
    ]
)


def test_evaluate_rank_hand_worked() -> None:
    out = evaluate_rank(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=50)
    # q0: AP = (1/2 + 2/4) / 2 = 0.5, INP = 2/4;  q3: AP = 1/2, INP = 1/2;  q4: AP = 1, INP = 1
    assert out["num_valid_queries"] == 3 and out["num_queries"] == 5
    assert out["mAP"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert out["mINP"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert len(out["cmc"]) == 5  # max_rank clipped to the gallery size
    np.testing.assert_allclose(out["cmc"], [1 / 3, 1, 1, 1, 1])


def test_evaluate_rank_ties_follow_gallery_index() -> None:
    # all distances equal: the ranking is the gallery order, so the first true match decides rank-1
    g_pids = np.array([5, 7, 7])
    g_cams = np.array([1, 1, 1])
    out = evaluate_rank(np.zeros((1, 3)), np.array([7]), g_pids, np.array([0]), g_cams)
    assert out["cmc"][0] == 0.0 and out["cmc"][1] == 1.0
    assert out["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    swapped = evaluate_rank(np.zeros((1, 3)), np.array([7]), g_pids[::-1].copy(), np.array([0]), g_cams)
    assert swapped["cmc"][0] == 1.0


def test_evaluate_rank_distractors_never_match() -> None:
    # a distractor (id 0) ranked first costs rank-1 for a real query
    out = evaluate_rank(np.array([[0.0, 1.0]]), np.array([4]), np.array([0, 4]), np.array([0]), np.array([1, 1]))
    assert out["cmc"][0] == 0.0 and out["mAP"] == pytest.approx(0.5)


def test_evaluate_rank_no_valid_query_is_an_error() -> None:
    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate_rank(np.zeros((1, 2)), np.array([1]), np.array([1, 2]), np.array([0]), np.array([0, 3]))


def test_evaluate_rank_shape_errors() -> None:
    with pytest.raises(ValueError, match="query ids"):
        evaluate_rank(np.zeros((2, 2)), np.array([1]), np.array([1, 2]), np.array([0]), np.array([0, 3]))


def _reference_market(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """Straight transcription of the protocol, one query and one gallery item at a time."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    cmcs, aps, inps = [], [], []
    for i in range(num_q):
        order = sorted(range(num_g), key=lambda j: (distmat[i, j], j))
        kept = [j for j in order if not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])]
        flags = [1 if g_pids[j] == q_pids[i] else 0 for j in kept]
        if sum(flags) == 0:
            continue
        found, precisions, last = 0, [], 0
        for rank, flag in enumerate(flags, start=1):
            if flag:
                found += 1
                precisions.append(found / rank)
                last = rank
        aps.append(sum(precisions) / len(precisions))
        inps.append(found / last)
        first = flags.index(1) + 1
        cmcs.append([1.0 if first <= k else 0.0 for k in range(1, max_rank + 1)])
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), len(aps)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_evaluate_rank_matches_loop_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_q, num_g = 23, 61
    q_pids = rng.integers(0, 8, num_q)
    g_pids = rng.integers(-1, 8, num_g)
    q_cams = rng.integers(0, 3, num_q)
    g_cams = rng.integers(0, 3, num_g)
    dist = rng.integers(0, 6, (num_q, num_g)).astype(np.float32)  # many ties
    out = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    cmc, m_ap, m_inp, n_valid = _reference_market(dist, q_pids, g_pids, q_cams, g_cams, 10)
    assert out["num_valid_queries"] == n_valid
    np.testing.assert_allclose(out["cmc"], cmc, atol=1e-12)
    assert out["mAP"] == pytest.approx(m_ap, abs=1e-12)
    assert out["mINP"] == pytest.approx(m_inp, abs=1e-12)


def test_pairwise_distance_is_squared_euclidean_of_normalised_rows() -> None:
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    expected = ((qn[:, None, :] - gn[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(pairwise_distance(q, g), expected, atol=1e-5)


# --- k-reciprocal re-ranking -----------------------------------------------------------------------


def _reference_rerank(q, g, k1, k2, lam):
    """Loop transcription of Zhong et al. 2017 with the reference implementation's conventions, in float64."""
    feats = np.concatenate([q, g]).astype(np.float32)
    n, nq = len(feats), len(q)
    sq = (feats * feats).sum(1, keepdims=True)
    d = sq + sq.T - 2.0 * (feats @ feats.T)  # float32, like the implementation
    d = (d / d.max(axis=0)).T.astype(np.float64)
    rank = [sorted(range(n), key=lambda j, i=i: (d[i, j], j)) for i in range(n)]

    def recip(i, k):
        return [j for j in rank[i][: k + 1] if i in rank[j][: k + 1]]

    half = int(np.around(k1 / 2))
    v = np.zeros((n, n))
    for i in range(n):
        core = recip(i, k1)
        members = set(core)
        for c in core:
            cset = recip(c, half)
            if len(set(cset) & set(core)) > 2 / 3 * len(cset):
                members |= set(cset)
        total = sum(np.exp(-d[i, j]) for j in members)
        for j in members:
            v[i, j] = np.exp(-d[i, j]) / total
    if k2 != 1:
        v = np.array([np.mean([v[j] for j in rank[i][:k2]], axis=0) for i in range(n)])
    out = np.zeros((nq, n - nq))
    for i in range(nq):
        for jj in range(n - nq):
            j = nq + jj
            m = sum(min(v[i, k], v[j, k]) for k in range(n))
            out[i, jj] = (1 - lam) * (1 - m / (2 - m)) + lam * d[i, j]
    return out


def _clustered(seed: int, ids: int, per_id: int, dim: int = 8):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(ids, dim)) * 2
    labels = np.repeat(np.arange(ids), per_id)
    feats = centers[labels] + rng.normal(size=(len(labels), dim))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats.astype(np.float32), labels


@pytest.mark.parametrize(("k1", "k2", "lam"), [(6, 3, 0.3), (5, 1, 0.5), (4, 2, 0.0)])
def test_rerank_matches_loop_transcription(k1: int, k2: int, lam: float) -> None:
    feats, _ = _clustered(0, ids=6, per_id=5)
    q, g = feats[:8], feats[8:]
    ref = _reference_rerank(q, g, k1, k2, lam)
    exact32 = k_reciprocal_rerank(q, g, k1=k1, k2=k2, lambda_value=lam, storage_dtype=np.float32)
    assert exact32.shape == (8, 22)
    np.testing.assert_allclose(exact32, ref, atol=2e-6)
    field16 = k_reciprocal_rerank(q, g, k1=k1, k2=k2, lambda_value=lam)  # float16 storage, as the reference
    np.testing.assert_allclose(field16, ref, atol=2e-3)


def test_rerank_lambda_one_is_row_scaled_original_distance() -> None:
    feats, _ = _clustered(1, ids=4, per_id=4)
    q, g = feats[:5], feats[5:]
    out = k_reciprocal_rerank(q, g, k1=4, k2=2, lambda_value=1.0)
    full = np.concatenate([q, g])
    d = ((full[:, None] - full[None]) ** 2).sum(-1)
    np.testing.assert_allclose(out, (d / d.max(axis=1, keepdims=True))[:5, 5:], atol=1e-5)


def test_rerank_improves_retrieval_on_clustered_features() -> None:
    feats, labels = _clustered(2, ids=8, per_id=6, dim=6)
    qi = np.arange(0, len(labels), 6)  # first image of each identity is the query
    gi = np.setdiff1d(np.arange(len(labels)), qi)
    cams_q, cams_g = np.zeros(len(qi)), np.ones(len(gi))
    base = evaluate_rank(pairwise_distance(feats[qi], feats[gi]), labels[qi], labels[gi], cams_q, cams_g)
    rr = evaluate_rank(k_reciprocal_rerank(feats[qi], feats[gi], k1=6, k2=3), labels[qi], labels[gi], cams_q, cams_g)
    assert rr["mAP"] >= base["mAP"]


def test_rerank_accepts_torch_tensors_and_checks_dims() -> None:
    import torch

    feats, _ = _clustered(3, ids=3, per_id=3)
    out = k_reciprocal_rerank(torch.from_numpy(feats[:2]), torch.from_numpy(feats[2:]), k1=3, k2=1)
    assert out.shape == (2, 7) and out.dtype == np.float32
    with pytest.raises(ValueError, match="dim"):
        k_reciprocal_rerank(feats[:2], feats[2:, :4])
