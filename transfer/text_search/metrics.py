"""Text-to-image person retrieval metrics: R@1/5/10, mAP and mINP, as IRRA (Jiang & Ye, CVPR 2023) reports them.

The protocol of CUHK-PEDES, ICFG-PEDES and RSTPReid (IRRA ``utils/metrics.py: rank``, used by every recent
text-based person search paper): each caption of the test split is a query, ranked against *all* test images
by descending cosine similarity. Unlike the re-ID protocol nothing is removed from the gallery (there are no
cameras), and every query's identity has images in the gallery by construction of the split.

- R@k: share of queries with at least one image of their identity among the top k (CMC at k);
- AP: mean over the query's true matches of precision at the rank of that match;
- INP: number of true matches / rank of the last (hardest) true match (Ye et al., TPAMI 2021);
- all in percent, averaged over queries.

Differences from IRRA's code, both where IRRA's result is undefined: equal similarities are ordered by gallery
index (a stable sort; IRRA's ``torch.argsort`` leaves the order of ties to the backend: stable on CPU below
17 gallery items, not above, nor on GPU), and a query whose identity has no gallery image is an error
(IRRA divides by zero and returns NaN). A gallery smaller than k gives R@k = R@(gallery size).
"""

from __future__ import annotations

import numpy as np

PROTOCOL = (
    "text-to-image retrieval (IRRA utils/metrics.py rank): every test caption queries all test images by "
    "cosine similarity, nothing removed; R@k, mAP, mINP in percent; ties broken by gallery index"
)
RANKS = (1, 5, 10)
_CHUNK_QUERIES = 1024  # bounds the (chunk, gallery) order/match matrices (CUHK-PEDES test: 6,156 x 3,074)


def evaluate_t2i(similarity: np.ndarray, query_pids: np.ndarray, gallery_pids: np.ndarray) -> dict[str, float]:
    """``{"R1", "R5", "R10", "mAP", "mINP"}`` in percent for a (queries, gallery) similarity, higher = closer."""
    sim = np.asarray(similarity)
    q_pids, g_pids = np.asarray(query_pids).reshape(-1), np.asarray(gallery_pids).reshape(-1)
    if sim.ndim != 2 or sim.shape != (len(q_pids), len(g_pids)):
        raise ValueError(f"similarity has shape {sim.shape}; expected ({len(q_pids)} queries, {len(g_pids)} gallery)")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError("evaluate_t2i needs at least one query and one gallery image")
    if not np.isfinite(sim).all():
        raise ValueError("similarity holds NaN or infinite values; the embeddings are broken")
    missing = ~np.isin(q_pids, g_pids)
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} of {len(q_pids)} queries have no gallery image of their identity "
            f"(e.g. id {q_pids[missing][0]}); text-to-image retrieval needs every query identity in the gallery"
        )
    hits_at = {k: 0.0 for k in RANKS}
    ap_sum = inp_sum = 0.0
    for start in range(0, len(q_pids), _CHUNK_QUERIES):
        block = sim[start : start + _CHUNK_QUERIES]
        order = np.argsort(-block, axis=1, kind="stable")  # descending similarity, ties by gallery index
        matches = g_pids[order] == q_pids[start : start + _CHUNK_QUERIES, None]
        first_hit = matches.argmax(axis=1)  # 0-based rank of the best true match
        for k in RANKS:
            hits_at[k] += float((first_hit < k).sum())
        positions = np.arange(1, matches.shape[1] + 1)
        hits_so_far = np.cumsum(matches, axis=1)
        n_relevant = hits_so_far[:, -1]
        precision_at_hits = (hits_so_far / positions) * matches
        ap_sum += float((precision_at_hits.sum(axis=1) / n_relevant).sum())
        last_hit = matches.shape[1] - np.argmax(matches[:, ::-1], axis=1)  # 1-based rank of the worst true match
        inp_sum += float((n_relevant / last_hit).sum())
    n = len(q_pids)
    out = {f"R{k}": 100.0 * hits_at[k] / n for k in RANKS}
    out["mAP"] = 100.0 * ap_sum / n
    out["mINP"] = 100.0 * inp_sum / n
    return out
