"""Text-to-image retrieval metrics (IRRA's rank protocol) on hand-worked cases and a per-query loop reference."""

from __future__ import annotations

import numpy as np
import pytest

from transfer.text_search.metrics import evaluate_t2i

# gallery images:  g0  g1  g2  g3  g4
GALLERY = np.array([1, 2, 1, 3, 2])
QUERIES = np.array([1, 3, 2, 2])
SIMILARITY = np.array(
    [
        # q0 (id 1), two matches: order g0 HIT, g1, g3, g4, g2 HIT -> AP (1/1 + 2/5) / 2 = 0.7, INP 2/5
        [0.9, 0.8, 0.1, 0.5, 0.2],
        # q1 (id 3), its only match ranked last: g0, g1, g2, g4, g3 HIT -> AP 1/5, INP 1/5
        [0.9, 0.8, 0.7, 0.1, 0.6],
        # q2 (id 2), every similarity tied: gallery order g0, g1 HIT, g2, g3, g4 HIT -> AP (1/2 + 2/5) / 2, INP 2/5
        [0.5, 0.5, 0.5, 0.5, 0.5],
        # q3 (id 2), a match tied with a miss at the top: g1 HIT (lower index first), g3, g4 HIT -> AP (1 + 2/3) / 2
        [0.1, 0.9, 0.2, 0.9, 0.3],
    ]
)


def test_hand_worked_ties_multiple_matches_and_last_match() -> None:
    out = evaluate_t2i(SIMILARITY, QUERIES, GALLERY)
    assert set(out) == {"R1", "R5", "R10", "mAP", "mINP"}
    assert out["R1"] == pytest.approx(50.0)  # q0 and q3
    assert out["R5"] == pytest.approx(100.0) and out["R10"] == pytest.approx(100.0)  # gallery of 5: R10 = R5
    assert out["mAP"] == pytest.approx(100 * (0.7 + 0.2 + 0.45 + 5 / 6) / 4)
    assert out["mINP"] == pytest.approx(100 * (0.4 + 0.2 + 0.4 + 2 / 3) / 4)


def test_tie_order_is_by_gallery_index() -> None:
    # the same tie with the miss first in the gallery: now the match is rank 2
    out = evaluate_t2i(np.array([[0.9, 0.9]]), np.array([7]), np.array([5, 7]))
    assert out["R1"] == 0.0 and out["mAP"] == pytest.approx(50.0) and out["mINP"] == pytest.approx(50.0)


def test_rank_5_and_10_differ_when_the_match_is_at_rank_7() -> None:
    gallery = np.arange(12)
    sim = -np.arange(12, dtype=float)[None, :]  # g0 first ... g11 last
    out = evaluate_t2i(sim, np.array([6]), gallery)
    assert (out["R1"], out["R5"], out["R10"]) == (0.0, 0.0, 100.0)
    assert out["mAP"] == pytest.approx(100 / 7) and out["mINP"] == pytest.approx(100 / 7)


def _reference(sim: np.ndarray, q: np.ndarray, g: np.ndarray) -> dict[str, float]:
    """The definitions written out one query at a time."""
    r = {1: [], 5: [], 10: []}
    aps, inps = [], []
    for i in range(len(q)):
        ranked = sorted(range(len(g)), key=lambda j: (-sim[i, j], j))
        hit_ranks = [pos + 1 for pos, j in enumerate(ranked) if g[j] == q[i]]
        for k in r:
            r[k].append(hit_ranks[0] <= k)
        aps.append(np.mean([(n + 1) / rank for n, rank in enumerate(hit_ranks)]))
        inps.append(len(hit_ranks) / hit_ranks[-1])
    return {"R1": 100 * np.mean(r[1]), "R5": 100 * np.mean(r[5]), "R10": 100 * np.mean(r[10]),
            "mAP": 100 * np.mean(aps), "mINP": 100 * np.mean(inps)}  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_a_per_query_reference_with_many_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 15, 40)
    q = rng.choice(g, 60)
    sim = rng.integers(0, 5, (60, 40)) / 4.0  # coarse values: ties everywhere, beyond torch's stable range
    out, ref = evaluate_t2i(sim, q, g), _reference(sim, q, g)
    for key in ref:
        assert out[key] == pytest.approx(ref[key])


def test_a_query_without_gallery_match_is_an_error_not_nan() -> None:
    with pytest.raises(ValueError, match="1 of 2 queries have no gallery image"):
        evaluate_t2i(np.zeros((2, 2)), np.array([1, 9]), np.array([1, 2]))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="expected \\(2 queries, 3 gallery\\)"):
        evaluate_t2i(np.zeros((2, 2)), np.array([1, 2]), np.array([1, 2, 3]))
