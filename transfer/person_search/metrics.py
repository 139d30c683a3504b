"""Person search mAP and top-k, CUHK-SYSU and PRW protocols, as in the reference evaluation.

Reference: OIM's ``psdb.evaluate_search`` (Xiao et al.) as refactored in SeqNet's ``eval_func.py``
(``eval_search_cuhk`` / ``eval_search_prw``, CBGM off), which SOLIDER's person-search numbers come from.
Per query:

1. Gallery detections with score < ``det_thresh`` (0.5) are dropped; a frame left with none is skipped
   (but a target in it still counts towards the ground-truth total, so missing it costs recall).
2. Similarity = dot product of the query box embedding with each detection embedding (L2-normalised
   embeddings make it the cosine). A frame listed twice is searched once (SeqNet), counted twice.
3. In a frame that contains the target (box ``[x1, y1, x2, y2]``, width w, height h), detections are taken
   in descending similarity (``np.argsort(sim)[::-1]``) and the *first* one with IoU >= min(0.5,
   w*h / ((w+10)*(h+10))) is the single true positive; the relaxed threshold helps small people.
   IoU has no +1 and is computed in float64 (the reference's float32 arithmetic differs only within
   ~1e-7 of the threshold).
4. AP = scikit-learn's ``average_precision_score`` over all searched detections (ties in similarity share
   one threshold), times recall = TPs found / gallery frames containing the target; 0 if nothing found.
   top-k = 1 if a true positive is among the k most similar detections. mAP and top-k are means over
   queries, as fractions.

CUHK-SYSU: each query has its own gallery of N frames (``TestG{N}.mat``, N in 50, 100 (default), 500,
1000, 2000, 4000). ``gallery_size=-1`` is the full test set: the 50-frame gallery's frames, then every
other test frame as negatives -- each frame once, as in OIM (SeqNet's refactor lists the protocol frames a
second time as negatives in this mode; the default sizes are unaffected).
PRW: a query's gallery is every test frame except its own (``cross_camera_only`` keeps only frames of
other cameras; SeqNet's default, used for published numbers, keeps all cameras).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import ClaspError

CUHK_SYSU_GALLERY_SIZES = (50, 100, 500, 1000, 2000, 4000)
TOPK = (1, 5, 10)

GalleryItem = tuple[str, Sequence[float] | np.ndarray | None]  # (frame name, target box x1y1x2y2 or None)


@dataclass(frozen=True)
class FrameDetections:
    """Detector + re-ID output on one gallery frame."""

    boxes_xyxy: np.ndarray  # (N, 4)
    scores: np.ndarray  # (N,)
    feats: np.ndarray  # (N, D), L2-normalised


@dataclass(frozen=True)
class SearchQuery:
    """One query: its own frame (never searched), its box embedding and the frames to search."""

    frame: str
    feat: np.ndarray  # (D,), L2-normalised
    gallery: Sequence[GalleryItem]


@dataclass(frozen=True)
class CuhkSysuProtocol:
    """The CUHK-SYSU test protocol: query frames, per-query galleries by size, and the test pool."""

    query_frames: Sequence[str]
    galleries: Mapping[int, Sequence[Sequence[GalleryItem]]]  # gallery size -> one gallery per query
    test_frames: Sequence[str] = field(default_factory=tuple)  # needed only for gallery_size=-1


@dataclass(frozen=True)
class PrwFrame:
    """Ground truth of one PRW test frame."""

    name: str
    boxes_xyxy: np.ndarray  # (M, 4)
    pids: np.ndarray  # (M,)
    cam_id: int


@dataclass(frozen=True)
class PrwQuery:
    frame: str
    pid: int
    cam_id: int


def search_map(
    queries: Sequence[SearchQuery],
    detections: Mapping[str, FrameDetections],
    *,
    det_thresh: float = 0.5,
    extra_negative_frames: Sequence[str] = (),
    topk: Sequence[int] = TOPK,
) -> dict[str, float | list[float]]:
    """mAP and top-k over ``queries`` given per-query galleries (protocol steps in the module docstring).

    ``detections`` maps every gallery frame name to its detections (a frame may be absent: no detections).
    ``extra_negative_frames``: frames searched after the gallery, known not to contain the target, skipping
    the query's frame and frames already searched (the CUHK-SYSU full-set mode).
    Returns ``{"mAP", "top1", "top5", "top10", "ap_per_query"}``.
    """
    if not queries:
        raise ClaspError("person search evaluation needs at least one query")
    kept = {name: _above_threshold(name, det, det_thresh) for name, det in detections.items()}
    kept = {name: det for name, det in kept.items() if det is not None}
    aps, hits = [], []
    for n, query in enumerate(queries):
        ap, hit = _evaluate_query(n, query, kept, extra_negative_frames, topk)
        aps.append(ap)
        hits.append(hit)
    result: dict[str, float | list[float]] = {"mAP": float(np.mean(aps))}
    for k, rate in zip(topk, np.mean(hits, axis=0), strict=True):
        result[f"top{k}"] = float(rate)
    result["ap_per_query"] = [float(ap) for ap in aps]
    return result


def cuhk_sysu_search_map(
    query_feats: np.ndarray,
    protocol: CuhkSysuProtocol,
    detections: Mapping[str, FrameDetections],
    *,
    gallery_size: int = 100,
    det_thresh: float = 0.5,
) -> dict[str, float | list[float]]:
    """CUHK-SYSU mAP / top-k with the per-query galleries of ``gallery_size`` frames (-1: full test set)."""
    full_set = gallery_size == -1
    size = 50 if full_set else gallery_size
    if size not in protocol.galleries:
        raise ClaspError(
            f"no CUHK-SYSU galleries of size {size} in the protocol (have {sorted(protocol.galleries)}); "
            f"the standard sizes are {CUHK_SYSU_GALLERY_SIZES}"
        )
    galleries = protocol.galleries[size]
    if not (len(galleries) == len(protocol.query_frames) == len(query_feats)):
        raise ClaspError(
            f"CUHK-SYSU protocol has {len(protocol.query_frames)} queries and {len(galleries)} galleries of size "
            f"{size}, but {len(query_feats)} query features were given"
        )
    if full_set and not protocol.test_frames:
        raise ClaspError("gallery_size=-1 (full set) needs protocol.test_frames, the list of test frames")
    for n, gallery in enumerate(galleries):
        if len(gallery) != size:
            raise ClaspError(f"CUHK-SYSU query {n}: its gallery lists {len(gallery)} frames, expected {size}")
    queries = [
        SearchQuery(frame=frame, feat=np.asarray(feat), gallery=gallery)
        for frame, feat, gallery in zip(protocol.query_frames, query_feats, galleries, strict=True)
    ]
    extra = protocol.test_frames if full_set else ()
    return search_map(queries, detections, det_thresh=det_thresh, extra_negative_frames=extra)


def prw_search_map(
    query_feats: np.ndarray,
    queries: Sequence[PrwQuery],
    frames: Sequence[PrwFrame],
    detections: Mapping[str, FrameDetections],
    *,
    cross_camera_only: bool = False,
    det_thresh: float = 0.5,
) -> dict[str, float | list[float]]:
    """PRW mAP / top-k: each query searches all test ``frames`` but its own (other cameras only if asked)."""
    if len(query_feats) != len(queries):
        raise ClaspError(f"PRW: {len(queries)} queries but {len(query_feats)} query features")
    search_queries = []
    for query, feat in zip(queries, query_feats, strict=True):
        gallery: list[GalleryItem] = []
        for frame in frames:
            if frame.name == query.frame or (cross_camera_only and frame.cam_id == query.cam_id):
                continue
            matches = np.asarray(frame.boxes_xyxy)[np.asarray(frame.pids) == query.pid]
            # The reference ravel()s the matching boxes and reads the first four numbers: the first box.
            gallery.append((frame.name, matches[0] if len(matches) else None))
        search_queries.append(SearchQuery(frame=query.frame, feat=np.asarray(feat), gallery=gallery))
    return search_map(search_queries, detections, det_thresh=det_thresh)


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score`` for binary labels: sum over distinct score thresholds of
    (recall step) x precision, with tied scores forming one threshold. Needs at least one positive."""
    y_true = np.asarray(y_true) == 1
    y_score = np.asarray(y_score)
    order = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[order], y_true[order]
    threshold_idx = np.r_[np.where(np.diff(y_score))[0], y_true.size - 1]
    tps = np.cumsum(y_true, dtype=np.float64)[threshold_idx]
    if tps[-1] == 0:
        raise ClaspError("average precision is undefined without a positive sample")
    fps = 1 + threshold_idx.astype(np.float64) - tps
    precision = np.concatenate([(tps / (tps + fps))[::-1], [1.0]])
    recall = np.concatenate([(tps / tps[-1])[::-1], [0.0]])
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


# ------------------------------------------------------------------------------------------ internals


def _above_threshold(name: str, det: FrameDetections, det_thresh: float) -> FrameDetections | None:
    boxes = np.asarray(det.boxes_xyxy).reshape(-1, 4)
    scores = np.asarray(det.scores).reshape(-1)
    feats = np.asarray(det.feats)
    if not (len(boxes) == len(scores) == len(feats)):
        raise ClaspError(
            f"gallery frame {name!r}: {len(boxes)} boxes, {len(scores)} scores and {len(feats)} features differ"
        )
    keep = scores >= det_thresh
    if not keep.any():
        return None
    return FrameDetections(boxes[keep], scores[keep], feats[keep].reshape(int(keep.sum()), -1))


def _evaluate_query(
    n: int,
    query: SearchQuery,
    detections: Mapping[str, FrameDetections],
    extra_negative_frames: Sequence[str],
    topk: Sequence[int],
) -> tuple[float, list[int]]:
    feat = np.asarray(query.feat).ravel()
    labels, sims = [], []
    count_gt = count_tp = 0
    searched = {query.frame}
    seen_in_gallery: set[str] = set()
    for frame, target in query.gallery:
        count_gt += target is not None
        det = detections.get(frame)
        if det is None or frame in seen_in_gallery:
            continue
        seen_in_gallery.add(frame)
        searched.add(frame)
        if det.feats.shape[1] != feat.size:
            raise ClaspError(
                f"query {n}: embedding size {feat.size} differs from frame {frame!r}'s {det.feats.shape[1]}"
            )
        sim = det.feats.dot(feat).ravel()
        label = np.zeros(len(sim), dtype=np.int32)
        if target is not None:
            target_box = np.asarray(target, dtype=np.float64).ravel()[:4]
            w, h = target_box[2] - target_box[0], target_box[3] - target_box[1]
            iou_thresh = min(0.5, (w * h * 1.0) / ((w + 10) * (h + 10)))
            order = np.argsort(sim)[::-1]
            sim, boxes = sim[order], det.boxes_xyxy[order].astype(np.float64)
            for j, box in enumerate(boxes):
                if _iou(box, target_box) >= iou_thresh:
                    label[j] = 1
                    count_tp += 1
                    break
        labels.append(label)
        sims.append(sim)
    for frame in extra_negative_frames:
        det = detections.get(frame)
        if frame in searched or det is None:
            continue
        searched.add(frame)
        sim = det.feats.dot(feat).ravel()
        labels.append(np.zeros(len(sim), dtype=np.int32))
        sims.append(sim)

    if count_gt == 0:
        raise ClaspError(f"query {n} (frame {query.frame!r}): no gallery frame contains its person, so AP is undefined")
    y_true = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int32)
    y_score = np.concatenate(sims) if sims else np.zeros(0)
    ap = 0.0 if count_tp == 0 else average_precision(y_true, y_score) * (count_tp * 1.0 / count_gt)
    ranked = y_true[np.argsort(y_score)[::-1]]
    return ap, [min(1, int(ranked[:k].sum())) for k in topk]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter * 1.0 / union)
