"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), with the numerical conventions of the implementation re-ID papers report with
(reid-strong-baseline / TransReID ``re_ranking``):

1. distances: squared Euclidean between all query+gallery features (the callers L2-normalise first);
2. each column is divided by its maximum and the matrix transposed, so row ``i`` holds the distances
   to sample ``i`` scaled into [0, 1];
3. R(i, k1): the k1-reciprocal neighbours of ``i`` among its k1+1 nearest (itself included);
4. expansion: for each ``c`` in R(i, k1), R(c, round(k1/2)) (numpy ``around``: half to even) is added
   when more than 2/3 of it already lies in R(i, k1);
5. V[i, j] = exp(-d(i, j)) / sum, over the expanded set; local query expansion replaces V[i] by the
   mean of V over the k2 nearest neighbours of ``i`` (skipped when k2 == 1);
6. Jaccard distance 1 - m / (2 - m) with m[i, j] = sum_k min(V[i, k], V[j, k]);
7. final = (1 - lambda) * Jaccard + lambda * scaled original distance, query rows x gallery columns.

The reference stores V and the Jaccard terms in float16 and accumulates ``m`` in float16 in
ascending order of ``k``; ``storage_dtype=np.float16`` (the default) reproduces that arithmetic,
``np.float32`` is the slightly more precise variant some forks use. Memory is O((nq+ng)^2) as in the
reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _as_matrix(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (num, dim) feature matrix, got shape {arr.shape}")
    return arr


def _reciprocal(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """Members of i's top-(k+1) list that also have i in their own top-(k+1), in i's rank order."""
    forward = rank[i, : k + 1]
    backward = rank[forward, : k + 1]
    return forward[(backward == i).any(axis=1)]


def k_reciprocal_rerank(
    q_feats: Any,
    g_feats: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    storage_dtype: type = np.float16,
) -> np.ndarray:
    """Re-ranked (num_query, num_gallery) distance matrix from query and gallery features (numpy or torch)."""
    q = _as_matrix(q_feats, "q_feats")
    g = _as_matrix(g_feats, "g_feats")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query features have dim {q.shape[1]} but gallery features have dim {g.shape[1]}")
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    num_q = q.shape[0]
    feats = np.concatenate([q, g], axis=0)
    num_all = feats.shape[0]

    sq_norm = (feats * feats).sum(axis=1, keepdims=True)
    dist = sq_norm + sq_norm.T - 2.0 * (feats @ feats.T)
    dist = (dist / dist.max(axis=0)).T.astype(np.float32)
    rank = np.argsort(dist, axis=1, kind="stable")

    half_k1 = int(np.around(k1 / 2))
    encoding = np.zeros((num_all, num_all), dtype=storage_dtype)
    for i in range(num_all):
        core = _reciprocal(rank, i, k1)
        expanded = [core]
        for candidate in core:
            cand_set = _reciprocal(rank, candidate, half_k1)
            if len(np.intersect1d(cand_set, core)) > 2 / 3 * len(cand_set):
                expanded.append(cand_set)
        members = np.unique(np.concatenate(expanded))
        weight = np.exp(-dist[i, members])
        encoding[i, members] = weight / weight.sum()

    if k2 != 1:
        expanded_enc = np.empty_like(encoding)
        for i in range(num_all):
            # numpy averages float16 with float32 intermediates; do the same explicitly.
            expanded_enc[i] = encoding[rank[i, :k2]].astype(np.float32).mean(axis=0)
        encoding = expanded_enc

    holders = [np.flatnonzero(encoding[:, k]) for k in range(num_all)]  # samples whose encoding uses k
    jaccard = np.empty((num_q, num_all), dtype=storage_dtype)
    for i in range(num_q):
        overlap = np.zeros(num_all, dtype=storage_dtype)
        for k in np.flatnonzero(encoding[i]):
            rows = holders[k]
            overlap[rows] = overlap[rows] + np.minimum(encoding[i, k], encoding[rows, k])
        jaccard[i] = 1 - overlap / (2 - overlap)

    final = jaccard * (1 - lambda_value) + dist[:num_q] * lambda_value
    return final[:, num_q:]
