"""Dense-task metrics: CityPersons MR^-2, COCO keypoint AP, person search mAP, parsing mIoU.

Hand-worked cases fix the protocol details users rely on (ignore regions, setup ranges, IoU exactly 0.5,
the small-box rule, recall-scaled AP, ignore pixels); slow literal transcriptions of the reference
algorithms, written here loop by loop, cross-check the vectorised code on random data with exact equality.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest

from pipeline.errors import ClaspError
from transfer.detection.metrics import (
    FPPI_REFERENCES,
    SETUPS,
    citypersons_all_setups,
    citypersons_miss_rate,
    citypersons_recall_at_fppi,
)
from transfer.parsing.metrics import confusion_matrix, parsing_scores
from transfer.person_search.metrics import (
    CuhkSysuProtocol,
    FrameDetections,
    PrwFrame,
    PrwQuery,
    SearchQuery,
    average_precision,
    cuhk_sysu_search_map,
    prw_search_map,
    search_map,
)
from transfer.pose.metrics import COCO_KEYPOINT_SIGMAS, coco_keypoint_ap, keypoint_oks

# ============================================================================================ CityPersons


def _gt_ann(ann_id, image_id, bbox, *, vis=1.0, ignore=0, category_id=1):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": list(bbox),
        "height": bbox[3],
        "vis_ratio": vis,
        "ignore": ignore,
        "iscrowd": 0,
    }


def _det(image_id, bbox, score, category_id=1):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}


def _gt(images, anns):
    return {
        "images": [{"id": i, "width": 2048, "height": 1024} for i in images],
        "categories": [{"id": 1, "name": "pedestrian"}],
        "annotations": anns,
    }


@pytest.fixture
def three_images():
    """Image 1: two people, an ignore region, a heavily occluded person; image 2: a small, a tiny (30 px)
    and a half-visible person plus one more; image 3: background only."""
    anns = [
        _gt_ann(1, 1, [0, 0, 40, 100]),  # a1
        _gt_ann(2, 1, [100, 0, 40, 100]),  # a2
        _gt_ann(3, 1, [200, 0, 100, 100], ignore=1),  # a3: ignore region
        _gt_ann(4, 1, [400, 0, 40, 100], vis=0.3),  # a4: heavy occlusion
        _gt_ann(5, 2, [0, 0, 24, 60], vis=0.9),  # b1: 60 px
        _gt_ann(6, 2, [100, 0, 12, 30]),  # b2: 30 px, below Reasonable's 50
        _gt_ann(7, 2, [200, 0, 40, 100], vis=0.8),  # b3
        _gt_ann(8, 2, [300, 0, 40, 100], vis=0.5),  # a5: heavy occlusion, never detected
    ]
    dets = [
        _det(1, [0, 0, 40, 100], 0.95),  # d1 -> a1
        _det(3, [0, 0, 40, 100], 0.90),  # d2 FP
        _det(1, [220, 10, 40, 80], 0.85),  # d3 inside a3: IoU 0.32 but IoA 1 -> dropped
        _det(2, [0, 0, 24, 60], 0.80),  # d4 -> b1
        _det(1, [400, 0, 40, 100], 0.75),  # d5 -> a4 (dropped by IoA where a4 is ignored)
        _det(2, [100, 0, 12, 30], 0.70),  # d6 -> b2; 30 px < 50/1.25 so removed in Reasonable
        _det(3, [300, 0, 40, 100], 0.65),  # d7 FP
        _det(2, [200, 0, 20, 100], 0.60),  # d8 -> b3 at IoU exactly 0.5
        _det(3, [500, 0, 40, 100], 0.55),  # d9 FP
        _det(3, [600, 0, 40, 100], 0.52),  # d11 FP
        _det(1, [100, 0, 40, 100], 0.50),  # d10 -> a2, after FPPI 1
    ]
    return _gt([1, 2, 3], anns), dets


def _log_avg(miss_rates):
    return math.exp(sum(math.log(m) for m in miss_rates) / len(miss_rates))


def test_citypersons_hand_worked_all_setups(three_images):
    gt, dets = three_images
    result = citypersons_all_setups(gt, dets)
    # Reasonable: regular a1 a2 b1 b3; kept TP,FP,TP,FP,TP,FP,FP,TP -> recall 1/4 before the first FP,
    # 2/4 at FPPI <= 0.5623 (one FP), 3/4 at FPPI <= 1 (three FPs).
    assert result["Reasonable"] == pytest.approx(_log_avg([0.75] * 7 + [0.5, 0.25]), rel=1e-12)
    # Reasonable_small: only b1 (60 px) is regular; d4 finds it and every other kept detection is
    # dropped by IoA -> miss rate 0 at every reference -> exactly 0 (no epsilon in the script).
    assert result["Reasonable_small"] == 0.0
    # Heavy: regular a4, a5 (vis 0.3, 0.5); kept FP(d2), TP(d5), FP, FP, FP. The first detection already
    # has FPPI 1/3 > 0.3162, so the script's index -1 takes the final recall 1/2 at the seven low references.
    assert result["Reasonable_occ=heavy"] == pytest.approx(0.5, rel=1e-12)
    # All: 7 regular (a3 is the only ignore region); kept T F T T T F T F F T.
    assert result["All"] == pytest.approx(_log_avg([6 / 7] * 7 + [3 / 7, 2 / 7]), rel=1e-12)
    for name in SETUPS:
        assert citypersons_miss_rate(gt, dets, name) == result[name]


def test_citypersons_recall_curve_and_references(three_images):
    gt, dets = three_images
    assert FPPI_REFERENCES.tolist() == [0.01, 0.0178, 0.0316, 0.0562, 0.1, 0.1778, 0.3162, 0.5623, 1.0]
    recall = citypersons_recall_at_fppi(gt, dets, "Reasonable")
    np.testing.assert_array_equal(recall, [0.25] * 7 + [0.5, 0.75])


def test_citypersons_iou_exactly_half_matches_and_just_below_does_not():
    gt = _gt([1], [_gt_ann(1, 1, [0, 0, 40, 100])])
    assert citypersons_miss_rate(gt, [_det(1, [0, 0, 20, 100], 0.9)], "Reasonable") == 0.0  # IoU 0.5
    assert citypersons_miss_rate(gt, [_det(1, [0, 0, 19.99, 100], 0.9)], "Reasonable") == 1.0  # IoU 0.49975


def _two_hits_around(extra: dict, extra_gt: list | None = None) -> float:
    """Image 1: people A, B, D (D never detected); image 2: empty. Detections: A (0.9), ``extra`` (0.5),
    B (0.1). If ``extra`` counts as a false positive the curve is recall 1/3 up to FPPI 0.5 and 2/3 after;
    if it is not scored (or dropped) recall is 2/3 everywhere."""
    people = [_gt_ann(1, 1, [0, 0, 40, 100]), _gt_ann(2, 1, [100, 0, 40, 100]), _gt_ann(3, 1, [200, 0, 40, 100])]
    gt = _gt([1, 2], people + (extra_gt or []))
    dets = [_det(1, [0, 0, 40, 100], 0.9), {**extra, "score": 0.5}, _det(1, [100, 0, 40, 100], 0.1)]
    return citypersons_miss_rate(gt, dets, "Reasonable")


EXTRA_IS_FP = _log_avg([2 / 3] * 7 + [1 / 3] * 2)
EXTRA_NOT_SCORED = 1 / 3


def test_citypersons_detection_height_margin():
    # Reasonable keeps detections of 50 / 1.25 = 40 px and taller (>=), so 40 px is a false positive ...
    assert _two_hits_around(_det(1, [500, 0, 16, 40], 0)) == pytest.approx(EXTRA_IS_FP, rel=1e-12)
    # ... and 39.9 px is removed before matching.
    assert _two_hits_around(_det(1, [500, 0, 16, 39.9], 0)) == pytest.approx(EXTRA_NOT_SCORED, rel=1e-12)


def test_citypersons_scores_category_one_only():
    # A category-2 detection is not scored ...
    assert _two_hits_around(_det(1, [500, 0, 40, 100], 0, category_id=2)) == pytest.approx(EXTRA_NOT_SCORED)
    # ... and a category-2 ground truth is not even an ignore region: a detection on it is a false positive.
    rider = [_gt_ann(9, 1, [500, 0, 40, 100], category_id=2)]
    assert _two_hits_around(_det(1, [500, 0, 40, 100], 0), rider) == pytest.approx(EXTRA_IS_FP, rel=1e-12)
    # An ignore region (or an out-of-setup person) does drop it, by IoA.
    region = [_gt_ann(9, 1, [480, 0, 400, 100], ignore=1)]
    assert _two_hits_around(_det(1, [500, 0, 40, 100], 0), region) == pytest.approx(EXTRA_NOT_SCORED)


def test_citypersons_cap_applies_before_height_filter():
    gt = _gt([1], [_gt_ann(1, 1, [0, 0, 40, 100])])
    hit = _det(1, [0, 0, 40, 100], 0.1)
    tiny = [_det(1, [500 + k, 0, 4, 10], 0.5) for k in range(999)]
    # 999 higher-scored 10 px detections are removed by the height filter and the hit survives ...
    assert citypersons_miss_rate(gt, [*tiny, hit], "Reasonable") == 0.0
    # ... but the 1000-per-image cap comes first, so a 1000th one pushes the hit out.
    assert citypersons_miss_rate(gt, [*tiny, _det(1, [0, 0, 4, 10], 0.5), hit], "Reasonable") == 1.0


def test_citypersons_match_to_ground_truth_id_zero_is_a_false_positive():
    hit = [_det(1, [0, 0, 40, 100], 0.9)]
    assert citypersons_miss_rate(_gt([1], [_gt_ann(1, 1, [0, 0, 40, 100])]), hit, "Reasonable") == 0.0
    assert citypersons_miss_rate(_gt([1], [_gt_ann(0, 1, [0, 0, 40, 100])]), hit, "Reasonable") == 1.0


def test_citypersons_undefined_empty_and_bad_input(three_images, tmp_path):
    gt, dets = three_images
    assert citypersons_miss_rate(gt, [], "All") == 1.0  # no detections: recall 0 everywhere
    no_small = _gt([1], [_gt_ann(1, 1, [0, 0, 40, 100])])
    assert math.isnan(citypersons_miss_rate(no_small, dets[:1], "Reasonable_small"))
    gt_path, dt_path = tmp_path / "val_gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt))
    dt_path.write_text(json.dumps(dets))
    assert citypersons_all_setups(gt_path, dt_path) == citypersons_all_setups(gt, dets)
    with pytest.raises(ClaspError, match="unknown CityPersons setup"):
        citypersons_miss_rate(gt, dets, "Heavy")
    with pytest.raises(ClaspError, match="image_id 99"):
        citypersons_miss_rate(gt, [_det(99, [0, 0, 1, 1], 0.5)], "All")
    with pytest.raises(ClaspError, match="category with id 1"):
        citypersons_miss_rate({**gt, "categories": [{"id": 2}]}, dets, "All")
    with pytest.raises(ClaspError, match="does not exist"):
        citypersons_miss_rate(tmp_path / "missing.json", dets, "All")


_REFERENCE_RANGES = {  # eval_MR_multisetup.py Params.HtRng / VisRng, by setup index
    "Reasonable": ((50, 1e10), (0.65, 1e10)),
    "Reasonable_small": ((50, 75), (0.65, 1e10)),
    "Reasonable_occ=heavy": ((50, 1e10), (0.2, 0.65)),
    "All": ((20, 1e10), (0.2, 1e10)),
}


def _reference_overlap(d, g, crowd):
    w = min(d[0] + d[2], g[0] + g[2]) - max(d[0], g[0])
    h = min(d[1] + d[3], g[1] + g[3]) - max(d[1], g[1])
    if w <= 0 or h <= 0:
        return 0.0
    union = d[2] * d[3] if crowd else d[2] * d[3] + g[2] * g[3] - w * h
    return float(w * h) / union


def _reference_miss_rate(gt, dets, setup):
    """The official evaluate/evaluateImg/accumulate/summarize, one detection and one gt at a time."""
    (h_lo, h_hi), (v_lo, v_hi) = _REFERENCE_RANGES[setup]
    image_ids = sorted({im["id"] for im in gt["images"]})
    evaluated = []
    for image_id in image_ids:
        gts = [dict(a) for a in gt["annotations"] if a["image_id"] == image_id and a["category_id"] == 1]
        dts = [dict(d, height=d["bbox"][3]) for d in dets if d["image_id"] == image_id and d["category_id"] == 1]
        if not gts and not dts:
            continue
        for a in gts:
            out = a["height"] < h_lo or a["height"] > h_hi or a["vis_ratio"] < v_lo or a["vis_ratio"] > v_hi
            a["ignore"] = 1 if out else a.get("ignore", 0)
        gts = [a for a in gts if not a["ignore"]] + [a for a in gts if a["ignore"]]
        dts = sorted(dts, key=lambda d: -d["score"])[:1000]
        dts = [d for d in dts if h_lo / 1.25 <= d["height"] < h_hi * 1.25]
        taken = [False] * len(gts)
        rows = []
        for d in dts:
            best, best_j, best_regular = 0.5, None, None
            for j, a in enumerate(gts):
                if taken[j]:
                    continue
                if best_regular is not None and a["ignore"]:
                    break
                overlap = _reference_overlap(d["bbox"], a["bbox"], a["ignore"])
                if overlap < best:
                    continue
                best, best_j, best_regular = overlap, j, not a["ignore"]
            if best_j is None:
                rows.append((d["score"], 0, False))
            else:
                taken[best_j] = taken[best_j] or best_regular
                rows.append((d["score"], gts[best_j]["id"], not best_regular))
        evaluated.append(([a["ignore"] for a in gts], rows))
    n_regular = sum(not flag for flags, _ in evaluated for flag in flags)
    if n_regular == 0:
        return math.nan
    ranked = sorted((row for _, rows in evaluated for row in rows), key=lambda row: -row[0])
    tp = fp = 0
    fppi, recall = [], []
    for _, matched_id, dropped in ranked:
        if dropped:
            continue
        tp, fp = (tp + 1, fp) if matched_id else (tp, fp + 1)
        fppi.append(fp / len(image_ids))
        recall.append(tp / n_regular)
    at_refs = [0.0] * 9
    with contextlib.suppress(IndexError):  # the script's bare except: no detection leaves zeros
        for r, ref in enumerate([0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.0000]):
            at_refs[r] = recall[sum(f <= ref for f in fppi) - 1]  # -1 wraps to the last, as in the script
    with np.errstate(divide="ignore"):
        return float(np.exp(np.mean(np.log(1 - np.array(at_refs)))))


def _random_citypersons(rng):
    images = [int(i) for i in rng.permutation(np.arange(1, int(rng.integers(1, 25)) + 1) * 3)]
    anns, dets, ann_id = [], [], int(rng.integers(0, 2))
    integer = rng.random() < 0.5
    for image_id in images:
        for _ in range(int(rng.integers(0, 6))):
            h = float(rng.choice([rng.uniform(10, 200), 50, 75, 20, 40]))
            box = [rng.uniform(0, 1900), rng.uniform(0, 800), h * 0.41, h]
            box = [max(1, round(v)) for v in box] if integer else box
            vis = float(rng.choice([rng.uniform(0, 1), 0.65, 0.2]))
            cat = 1 if rng.random() < 0.85 else 2
            anns.append(_gt_ann(ann_id, image_id, box, vis=vis, ignore=int(rng.random() < 0.15), category_id=cat))
            anns[-1]["height"] = box[3]
            ann_id += 1
            for _ in range(int(rng.integers(0, 3))):
                jitter = rng.normal(0, 0.15 * box[2], 4) if rng.random() < 0.8 else np.zeros(4)
                dbox = [
                    box[0] + jitter[0],
                    box[1] + jitter[1],
                    max(1.0, box[2] + jitter[2]),
                    max(1.0, box[3] + jitter[3]),
                ]
                dbox = [max(1, round(v)) for v in dbox] if integer else dbox
                score = float(round(rng.random(), 1 if rng.random() < 0.3 else 6))  # ties included
                dets.append(_det(image_id, dbox, score, category_id=1 if rng.random() < 0.95 else 2))
        for _ in range(int(rng.integers(0, 4))):
            h = rng.uniform(10, 200)
            dets.append(_det(image_id, [rng.uniform(0, 1900), rng.uniform(0, 800), h * 0.41, h], float(rng.random())))
    order = rng.permutation(len(dets))
    return _gt(images, anns), [dets[i] for i in order]


def test_citypersons_equals_literal_reference_on_random_sets():
    n_cases = 0
    for seed in range(40):
        gt, dets = _random_citypersons(np.random.default_rng(seed))
        result = citypersons_all_setups(gt, dets)
        for setup in SETUPS:
            expected = _reference_miss_rate(gt, dets, setup)
            assert (math.isnan(expected) and math.isnan(result[setup])) or result[setup] == expected, (seed, setup)
            n_cases += 0 < expected < 1
    assert n_cases > 60  # most cases are informative, not 0 / 1 / NaN


def test_citypersons_does_not_modify_inputs(three_images):
    gt, dets = three_images
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    citypersons_all_setups(gt, dets)
    assert gt == gt_before and dets == dets_before


# =================================================================================================== pose


def _person(ann_id, image_id, keypoints, bbox, area):
    kp = np.asarray(keypoints, dtype=float).reshape(17, 3)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "keypoints": kp.ravel().tolist(),
        "num_keypoints": int((kp[:, 2] > 0).sum()),
        "area": area,
        "bbox": bbox,
        "iscrowd": 0,
    }


def _pose_gt():
    rng = np.random.default_rng(3)
    people = []
    for ann_id, image_id in ((1, 1), (2, 2)):
        kp = np.stack([rng.uniform(100, 200, 17), rng.uniform(100, 400, 17), np.full(17, 2)], 1)
        people.append(_person(ann_id, image_id, kp, [100, 100, 100, 300], 20000.0))  # large (> 96^2)
    images = [{"id": i, "width": 640, "height": 480} for i in (1, 2, 3)]  # image 3: nobody
    return {"images": images, "annotations": people, "categories": [{"id": 1, "name": "person"}]}


def test_keypoint_ap_perfect_half_and_empty():
    gt = _pose_gt()
    perfect = [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 0.9}
        for a in gt["annotations"]
    ]
    stats = coco_keypoint_ap(gt, perfect)
    assert stats["AP"] == stats["AP50"] == stats["APl"] == stats["AR"] == 1.0
    assert stats["APm"] == -1.0  # no medium person: COCOeval's "undefined"
    # Image 2 gets no result: recall stops at 1/2, precision 1 up to there -> 51 of 101 recall points.
    half = coco_keypoint_ap(gt, perfect[:1])
    assert half["AP"] == pytest.approx(51 / 101, rel=1e-12) and half["AR"] == 0.5
    assert all(v == 0.0 for k, v in coco_keypoint_ap(gt, []).items() if k not in ("APm", "ARm"))
    assert gt == _pose_gt()  # not modified
    with pytest.raises(ClaspError, match="image_id 7"):
        coco_keypoint_ap(gt, [{**perfect[0], "image_id": 7}])


def test_keypoint_oks_hand_worked_and_equal_to_cocoeval():
    gt_kp = np.zeros((17, 3))
    gt_kp[0] = [10, 10, 2]  # only the nose is labelled
    dt_kp = np.zeros((17, 3))
    dt_kp[0] = [13, 14, 1]  # 5 px away
    area = 400.0
    expected = math.exp(-25 / (2 * (area + np.spacing(1)) * (2 * COCO_KEYPOINT_SIGMAS[0]) ** 2))
    assert keypoint_oks(gt_kp.ravel(), area, [0, 0, 20, 20], [dt_kp.ravel()])[0] == pytest.approx(expected, rel=1e-12)

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    anns, results = [], []
    for ann_id in range(1, 7):
        v = rng.integers(0, 3, 17) * (rng.random() > 0.3)  # some people with no labelled joint
        kp = np.stack([rng.uniform(0, 300, 17) * (v > 0), rng.uniform(0, 300, 17) * (v > 0), v], 1)
        anns.append(_person(ann_id, 1, kp, list(rng.uniform(20, 200, 4)), float(rng.uniform(500, 40000))))
        for _ in range(2):
            dt = np.stack([rng.uniform(0, 300, 17), rng.uniform(0, 300, 17), np.ones(17)], 1)
            results.append(
                {"image_id": 1, "category_id": 1, "keypoints": dt.ravel().tolist(), "score": float(rng.random())}
            )
    gt = {"images": [{"id": 1}], "annotations": anns, "categories": [{"id": 1}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "keypoints")
        evaluator.evaluate()
    reference = evaluator.ious[(1, 1)]  # rows: results by descending score
    ranked = sorted(results, key=lambda r: -r["score"])
    for j, ann in enumerate(anns):
        mine = keypoint_oks(ann["keypoints"], ann["area"], ann["bbox"], [r["keypoints"] for r in ranked])
        np.testing.assert_array_equal(mine, reference[:, j])


# ========================================================================================== person search


def _frame(boxes, sims, scores=None, dim=4):
    """Detections whose embeddings have the given dot products with the query embedding e0."""
    sims = np.asarray(sims, dtype=np.float64)
    feats = np.zeros((len(sims), dim))
    feats[:, 0] = sims
    feats[:, 1] = np.sqrt(1 - sims**2)
    scores = np.full(len(sims), 0.9) if scores is None else np.asarray(scores)
    return FrameDetections(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), scores, feats)


QUERY_FEAT = np.array([1.0, 0.0, 0.0, 0.0])


def _reference_ap(y_true, y_score):
    """Precision-weighted recall steps over distinct score thresholds, one threshold at a time."""
    n_pos = sum(y_true)
    total, prev_recall = 0.0, 0.0
    for thr in sorted(set(y_score), reverse=True):
        chosen = [t for t, s in zip(y_true, y_score, strict=True) if s >= thr]
        recall = sum(chosen) / n_pos
        total += (recall - prev_recall) * (sum(chosen) / len(chosen))
        prev_recall = recall
    return total


def test_average_precision_hand_worked_and_literal():
    assert average_precision(np.array([1, 0, 1]), np.array([0.9, 0.8, 0.7])) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5  # a tie is one threshold
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        y = (rng.random(n) < 0.4).astype(int)
        y[rng.integers(n)] = 1
        s = np.round(rng.random(n), 1)
        assert average_precision(y, s) == pytest.approx(_reference_ap(list(y), list(s)), abs=1e-12)


def test_cuhk_small_box_rule():
    # Same relative overlap (IoU 0.4) with a 10x20 target and with a 100x200 one.
    small = SearchQuery("q.jpg", QUERY_FEAT, [("a.jpg", [0, 0, 10, 20])])
    big = SearchQuery("q.jpg", QUERY_FEAT, [("a.jpg", [0, 0, 100, 200])])
    # 10x20: threshold min(0.5, 200 / (20 * 30)) = 1/3, so IoU 0.4 is a hit.
    assert search_map([small], {"a.jpg": _frame([[0, 0, 10, 8]], [0.8])})["mAP"] == 1.0
    # 100x200: threshold 0.5, the same IoU is not.
    result = search_map([big], {"a.jpg": _frame([[0, 0, 100, 80]], [0.8])})
    assert result["mAP"] == 0.0 and result["top1"] == 0.0


def test_search_missed_target_scales_ap_and_first_match_only():
    gallery = [("a.jpg", [0, 0, 50, 100]), ("b.jpg", [0, 0, 50, 100]), ("c.jpg", None)]
    dets = {
        # Two detections on the target in a.jpg: only the more similar one is the true positive.
        "a.jpg": _frame([[0, 0, 50, 100], [2, 2, 50, 100], [300, 0, 350, 100]], [0.7, 0.9, 0.2]),
        "b.jpg": _frame([[0, 0, 50, 100]], [0.95], scores=[0.49]),  # below det_thresh: target missed
        "c.jpg": _frame([[0, 0, 50, 100]], [0.5]),
    }
    result = search_map([SearchQuery("q.jpg", QUERY_FEAT, gallery)], dets)
    # Ranked: 0.9 T, 0.7 F, 0.5 F, 0.2 F -> AP 1; found 1 of 2 target frames -> 0.5.
    assert result["mAP"] == pytest.approx(0.5) and result["top1"] == 1.0
    # The 0.49 detection counts once the threshold allows it: ranked 0.95 T, 0.9 T -> AP 1, recall 1.
    assert search_map([SearchQuery("q.jpg", QUERY_FEAT, gallery)], dets, det_thresh=0.4)["mAP"] == pytest.approx(1.0)


def test_cuhk_gallery_sizes_and_full_set():
    target = ("a.jpg", [0, 0, 50, 100])
    dets = {
        "a.jpg": _frame([[0, 0, 50, 100]], [0.6]),
        "b.jpg": _frame([[0, 0, 50, 100]], [0.7]),
        "c.jpg": _frame([[0, 0, 50, 100]], [0.8]),
        "q.jpg": _frame([[0, 0, 50, 100]], [0.99]),  # the query's own frame: never searched
    }
    galleries = {1: [[target]], 2: [[target, ("b.jpg", None)]]}
    protocol = CuhkSysuProtocol(["q.jpg"], {**galleries, 50: [[target] * 50]}, ["a.jpg", "b.jpg", "c.jpg", "q.jpg"])
    feats = QUERY_FEAT[None]
    assert cuhk_sysu_search_map(feats, protocol, dets, gallery_size=1)["mAP"] == 1.0
    assert cuhk_sysu_search_map(feats, protocol, dets, gallery_size=2)["mAP"] == pytest.approx(0.5)  # F then T
    # Full set: the 50-frame gallery (a.jpg listed 50 times, searched once, counted 50 times) + b, c.
    full = cuhk_sysu_search_map(feats, protocol, dets, gallery_size=-1)
    assert full["mAP"] == pytest.approx((1 / 3) * (1 / 50)) and full["top1"] == 0.0 and full["top5"] == 1.0
    with pytest.raises(ClaspError, match="size 500"):
        cuhk_sysu_search_map(feats, protocol, dets, gallery_size=500)
    with pytest.raises(ClaspError, match="expected 2"):
        cuhk_sysu_search_map(feats, CuhkSysuProtocol(["q.jpg"], {2: [[target]]}), dets, gallery_size=2)


def test_prw_gallery_excludes_own_frame_and_optionally_same_camera():
    frames = [
        PrwFrame("q.jpg", np.array([[0, 0, 50, 100]]), np.array([7]), cam_id=1),
        PrwFrame("same_cam.jpg", np.array([[0, 0, 50, 100]]), np.array([7]), cam_id=1),
        PrwFrame("other_cam.jpg", np.array([[0, 0, 50, 100], [60, 0, 110, 100]]), np.array([3, 7]), cam_id=2),
    ]
    dets = {
        "q.jpg": _frame([[0, 0, 50, 100]], [1.0]),
        "same_cam.jpg": _frame([[0, 0, 50, 100]], [0.9]),
        "other_cam.jpg": _frame([[0, 0, 50, 100], [60, 0, 110, 100]], [0.95, 0.5]),
    }
    query = [PrwQuery("q.jpg", pid=7, cam_id=1)]
    all_cams = prw_search_map(QUERY_FEAT[None], query, frames, dets)
    # Ranked 0.95 F (person 3), 0.9 T, 0.5 T -> AP = (1/2)(1/2) + (1/2)(2/3).
    assert all_cams["mAP"] == pytest.approx(0.25 + 1 / 3) and all_cams["top1"] == 0.0 and all_cams["top5"] == 1.0
    cross = prw_search_map(QUERY_FEAT[None], query, frames, dets, cross_camera_only=True)
    assert cross["mAP"] == pytest.approx(0.5)  # ranked 0.95 F, 0.5 T
    with pytest.raises(ClaspError, match="no gallery frame contains"):
        prw_search_map(QUERY_FEAT[None], [PrwQuery("q.jpg", pid=99, cam_id=1)], frames, dets)


# =============================================================================================== parsing


def test_parsing_hand_worked_with_ignore_pixels():
    gt = np.array([[0, 0, 1], [1, 255, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])  # predictions under 255 are not counted
    conf = confusion_matrix(gt, pred, num_classes=4)
    np.testing.assert_array_equal(conf, [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    scores = parsing_scores(conf)
    # IoU: class 0 = 1/2, class 1 = 2/3, classes 2 and 3 absent everywhere = 0 (still in the mean).
    assert scores["per_class_iou"] == pytest.approx([0.5, 2 / 3, 0.0, 0.0])
    assert scores["mIoU"] == pytest.approx((0.5 + 2 / 3) / 4)
    assert scores["pixel_acc"] == pytest.approx(3 / 4)
    assert scores["mean_acc"] == pytest.approx((1 / 2 + 1) / 4)


def test_parsing_matches_literal_counting_and_rejects_bad_labels():
    rng = np.random.default_rng(0)
    images = [(rng.integers(0, 5, (7, 9)), rng.integers(0, 5, (7, 9))) for _ in range(3)]
    for gt, _ in images:
        gt[rng.random(gt.shape) < 0.2] = 255
    conf = sum(confusion_matrix(gt, pred, 5) for gt, pred in images)
    pairs = [(g, p) for gt, pred in images for g, p in zip(gt.ravel(), pred.ravel(), strict=True) if g != 255]
    for c in range(5):
        tp = sum(g == c and p == c for g, p in pairs)
        union = sum(g == c or p == c for g, p in pairs)
        assert parsing_scores(conf)["per_class_iou"][c] == pytest.approx(tp / max(1, union))
    with pytest.raises(ClaspError, match="outside"):
        confusion_matrix(np.array([[0, 7]]), np.array([[0, 0]]), 5)
    with pytest.raises(ClaspError, match="outside"):
        confusion_matrix(np.array([[0, 1]]), np.array([[0, 5]]), 5)
    with pytest.raises(ClaspError, match="differs"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 5)
