"""Re-ID retrieval metrics under the Market-1501 protocol (CMC, mAP, mINP).

The protocol is the one every re-ID paper reports (torchreid's ``eval_market1501``, also used by
reid-strong-baseline, TransReID, fast-reid and SOLIDER):

- each query is ranked against the whole gallery by ascending distance;
- gallery entries with the query's identity *and* camera are removed from that query's list
  (they would be trivial same-view matches);
- a query with no remaining true match is skipped (it counts in neither CMC nor mAP);
- CMC(k) is the share of valid queries with a true match in the top k; AP is the mean of
  precision@rank over the ranks of the true matches; INP (Ye et al., "Deep Learning for Person
  Re-identification: A Survey", TPAMI 2021) is #true matches / rank of the hardest (last) one.

Junk images (Market id -1) are dropped by the dataset readers, as torchreid does; distractors
(Market id 0) stay in the gallery and simply never match a real query. Equal distances are
ordered by gallery index (stable sort) so results never depend on the sort algorithm.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PROTOCOL = (
    "Market-1501 protocol (torchreid eval_market1501): same-id same-camera gallery images removed per query, "
    "queries without a valid match skipped, ties broken by gallery index"
)

_CHUNK_QUERIES = 256  # bounds the (chunk, num_gallery) index/match matrices for MSMT17-sized galleries


def evaluate_rank(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
) -> dict[str, Any]:
    """CMC curve, mAP and mINP of a (num_query, num_gallery) distance matrix; smaller = more similar.

    Returns ``{"cmc": float64 array of length min(max_rank, num_gallery) (cmc[0] = rank-1, as a
    fraction), "mAP": float, "mINP": float, "num_valid_queries": int, "num_queries": int}``.
    Raises ``ValueError`` when no query has a valid match.
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids).ravel(), np.asarray(g_pids).ravel()
    q_camids, g_camids = np.asarray(q_camids).ravel(), np.asarray(g_camids).ravel()
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {distmat.shape}")
    num_q, num_g = distmat.shape
    if len(q_pids) != num_q or len(q_camids) != num_q:
        raise ValueError(f"{num_q} query rows but {len(q_pids)} query ids and {len(q_camids)} query cameras")
    if len(g_pids) != num_g or len(g_camids) != num_g:
        raise ValueError(f"{num_g} gallery columns but {len(g_pids)} gallery ids and {len(g_camids)} gallery cameras")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    max_rank = min(max_rank, num_g)

    hits_at_rank = np.zeros(max_rank, dtype=np.int64)  # valid queries whose first match is within rank k
    aps: list[float] = []
    inps: list[float] = []
    for start in range(0, num_q, _CHUNK_QUERIES):
        stop = min(start + _CHUNK_QUERIES, num_q)
        order = np.argsort(distmat[start:stop], axis=1, kind="stable")
        same_id = g_pids[order] == q_pids[start:stop, None]
        same_cam = g_camids[order] == q_camids[start:stop, None]
        for row in range(stop - start):
            matches = same_id[row][~(same_id[row] & same_cam[row])]
            positions = np.flatnonzero(matches)  # 0-based ranks of the true matches in the kept list
            if positions.size == 0:
                continue
            first = positions[0]
            if first < max_rank:
                hits_at_rank[first] += 1
            num_rel = positions.size
            precision_at_hits = np.arange(1, num_rel + 1) / (positions + 1.0)
            aps.append(float(precision_at_hits.mean()))
            inps.append(num_rel / (positions[-1] + 1.0))
    if not aps:
        raise ValueError("no query has a valid match in the gallery (every query identity is absent or same-camera)")
    num_valid = len(aps)
    cmc = np.cumsum(hits_at_rank) / num_valid
    return {
        "cmc": cmc,
        "mAP": float(np.mean(aps)),
        "mINP": float(np.mean(inps)),
        "num_valid_queries": num_valid,
        "num_queries": num_q,
    }


def pairwise_distance(q_feats: Any, g_feats: Any, *, normalize: bool = True) -> np.ndarray:
    """Squared Euclidean distance between feature rows (cosine distance x2 when ``normalize``).

    The field (reid-strong-baseline / TransReID with ``FEAT_NORM: yes``) L2-normalises features and
    ranks by squared Euclidean distance; the ranking equals cosine-similarity ranking.
    """
    import torch

    q = torch.as_tensor(np.asarray(q_feats), dtype=torch.float32)
    g = torch.as_tensor(np.asarray(g_feats), dtype=torch.float32)
    if normalize:
        q = torch.nn.functional.normalize(q, dim=1)
        g = torch.nn.functional.normalize(g, dim=1)
    dist = q.pow(2).sum(1, keepdim=True) + g.pow(2).sum(1)[None, :] - 2.0 * q @ g.T
    return dist.numpy()
