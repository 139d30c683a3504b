"""COCO person keypoints for top-down pose: the reader and the person crops with their heatmap targets.

Layout (the official one; ``clasp synth`` writes the same): ``DATA/annotations/person_keypoints_<split>.json``
and ``DATA/<split>/<file_name>``. Training uses every non-crowd person with ``num_keypoints > 0``.
Evaluation crops either the ground-truth boxes of those people (score 1) or the boxes of a detections
file ``[{image_id, category_id, bbox: [x, y, w, h], score}]`` (category 1, score >= a threshold), as the
COCO top-down protocol of SimpleBaseline / ViTPose does.

Geometry: a box is grown to the input aspect ratio (height:width of ``img_size``) around its centre and
padded by 1.25; training adds random scale, rotation and horizontal flip. Coordinates are continuous
with pixel centres at integers (COCO keypoints); the crop is one affine map applied to pixels and joints
alike, and heatmap pixel ``j`` covers input pixels ``[j * stride, (j + 1) * stride)``, so a horizontally
flipped heatmap lines up with the flipped input without any shift.
Heatmap targets and their decoding (classic and UDP) are in ``transfer.pose.heatmaps``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ClaspError
from transfer.pose.heatmaps import encode_heatmaps, to_heatmap_coords, udp_scale

NUM_JOINTS = 17
# Left/right joint pairs in COCO order (eyes, ears, shoulders, elbows, wrists, hips, knees, ankles).
FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
BOX_PADDING = 1.25
UPPER_BODY = tuple(range(11))  # nose, eyes, ears, shoulders, elbows, wrists (COCO order)
HALF_BODY_PADDING = 1.5  # ViTPose / mmpose TopDownHalfBodyTransform's scale factor


def flip_permutation(num_joints: int = NUM_JOINTS, pairs: Sequence[tuple[int, int]] = FLIP_PAIRS) -> list[int]:
    """Index map ``perm`` with ``flipped[k] = original[perm[k]]``: left and right joints swap."""
    perm = list(range(num_joints))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


@dataclass
class PersonBox:
    """One person to crop: its image, box and (for training / GT evaluation) its annotated joints."""

    image_id: int
    path: str
    bbox: tuple[float, float, float, float]  # x, y, w, h in image pixels
    score: float = 1.0
    keypoints: np.ndarray | None = None  # 17x3 (x, y, v)


@dataclass
class PoseData:
    name: str
    layout: str
    train: list[PersonBox]
    test: list[PersonBox]
    test_gt: Path  # annotation file the evaluation scores against
    boxes: str  # "ground truth" or the detections file
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "train_people": len(self.train),
            "test_boxes": len(self.test),
            "test_boxes_from": self.boxes,
            **self.counts,
        }


def _read_annotations(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ClaspError(
            f"{path} not found: a COCO keypoints folder holds annotations/person_keypoints_<split>.json "
            "and <split>/ images (get them from cocodataset.org, or write a synthetic one with write_coco_pose)"
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ClaspError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(record, dict) or not {"images", "annotations"} <= set(record):
        raise ClaspError(f"{path} lacks 'images' / 'annotations': not a COCO person-keypoints file")
    return record


def _people(record: dict[str, Any], image_dir: Path, path: Path) -> list[PersonBox]:
    """Non-crowd people with at least one labelled joint and a positive box, in annotation order."""
    files = {img["id"]: img["file_name"] for img in record["images"]}
    people = []
    for n, ann in enumerate(record["annotations"]):
        if ann.get("iscrowd", 0) or ann.get("num_keypoints", 0) <= 0 or ann.get("category_id", 1) != 1:
            continue
        kps = np.asarray(ann.get("keypoints", ()), dtype=np.float64)
        if kps.size != 3 * NUM_JOINTS:
            raise ClaspError(f"{path}: annotation #{n} has {kps.size} keypoint values, not {3 * NUM_JOINTS}")
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w <= 0 or h <= 0:
            continue
        if ann["image_id"] not in files:
            raise ClaspError(f"{path}: annotation #{n} refers to image_id {ann['image_id']}, not in 'images'")
        people.append(
            PersonBox(ann["image_id"], str(image_dir / files[ann["image_id"]]), (x, y, w, h), 1.0, kps.reshape(-1, 3))
        )
    return people


def _detections(path: Path, record: dict[str, Any], image_dir: Path, score_thr: float) -> list[PersonBox]:
    try:
        dets = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClaspError(
            f"detections file {path} does not exist (data.detections): put the person detections there "
            "(SimpleBaseline / ViTPose publish COCO_val2017_detections_AP_H_56_person.json), or set "
            "data.detections='' to evaluate on ground-truth boxes (about 2 AP higher, not comparable with papers)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ClaspError(f"detections file {path} is not valid JSON: {exc}") from None
    if not isinstance(dets, list):
        raise ClaspError(f"detections file {path} must be a list of {{image_id, category_id, bbox, score}}")
    files = {img["id"]: img["file_name"] for img in record["images"]}
    boxes = []
    for n, det in enumerate(dets):
        missing = [k for k in ("image_id", "bbox", "score") if k not in det]
        if missing:
            raise ClaspError(f"detections file {path}: entry #{n} lacks {', '.join(missing)}")
        if det.get("category_id", 1) != 1 or float(det["score"]) < score_thr:
            continue
        if det["image_id"] not in files:
            raise ClaspError(f"detections file {path}: entry #{n} has image_id {det['image_id']}, not in the split")
        x, y, w, h = (float(v) for v in det["bbox"])
        if w > 0 and h > 0:
            boxes.append(
                PersonBox(det["image_id"], str(image_dir / files[det["image_id"]]), (x, y, w, h), float(det["score"]))
            )
    return boxes


def load_coco_keypoints(
    data_dir: str | Path,
    *,
    train_split: str = "train2017",
    test_split: str = "val2017",
    detections: str = "",
    det_score_thr: float = 0.0,
) -> PoseData:
    """Training people and evaluation boxes of a COCO keypoints folder (ground-truth boxes unless ``detections``)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ClaspError(f"dataset folder {root} does not exist (--data)")
    paths = {s: root / "annotations" / f"person_keypoints_{s}.json" for s in (train_split, test_split)}
    train_record, test_record = _read_annotations(paths[train_split]), _read_annotations(paths[test_split])
    for split in (train_split, test_split):
        if not (root / split).is_dir():
            raise ClaspError(f"{root / split} not found: COCO images go in <data>/{split}/")
    train = _people(train_record, root / train_split, paths[train_split])
    if detections:
        det_path = Path(detections)
        if not det_path.is_absolute() and not det_path.is_file():
            det_path = root / det_path  # a paper-row config names the file relative to the dataset folder
        test = _detections(det_path, test_record, root / test_split, det_score_thr)
        boxes = f"detections file {detections} (score >= {det_score_thr})"
    else:
        test = _people(test_record, root / test_split, paths[test_split])
        boxes = "ground truth (non-crowd people with num_keypoints > 0)"
    if not train:
        raise ClaspError(f"{paths[train_split]} has no non-crowd person with num_keypoints > 0 to train on")
    return PoseData(
        name="coco",
        layout=f"annotations/person_keypoints_{{{train_split},{test_split}}}.json + {train_split}/, {test_split}/",
        train=train,
        test=test,
        test_gt=paths[test_split],
        boxes=boxes,
        counts={"train_images": len(train_record["images"]), "test_images": len(test_record["images"])},
    )


# --- geometry --------------------------------------------------------------------------------------


def box_to_center_size(
    bbox: Sequence[float], aspect_hw: float, padding: float = BOX_PADDING
) -> tuple[np.ndarray, np.ndarray]:
    """(centre, (width, height)) of the crop around ``bbox``: grown to ``aspect_hw`` = height / width, padded."""
    x, y, w, h = (float(v) for v in bbox)
    center = np.array([x + w / 2.0, y + h / 2.0])
    if h > aspect_hw * w:
        w = h / aspect_hw
    else:
        h = w * aspect_hw
    return center, np.array([w, h]) * padding


def crop_affine(
    center: np.ndarray, size: np.ndarray, out_hw: tuple[int, int], *, rotation_deg: float = 0.0, flip: bool = False
) -> np.ndarray:
    """3x3 map from image coordinates (pixel centres at integers) to crop coordinates (same convention).

    The crop box of ``size`` (w, h) around ``center``, rotated by ``rotation_deg`` (counter-clockwise in the
    image), fills the ``out_hw`` output; ``flip`` mirrors the output horizontally.
    """
    out_h, out_w = out_hw
    theta = math.radians(rotation_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    # built in the corner convention (pixel i spans [i, i + 1)), then conjugated to pixel centres at integers
    shift = np.array([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1.0]])
    to_origin = np.array([[1.0, 0, -center[0]], [0, 1.0, -center[1]], [0, 0, 1.0]])
    rotate = np.array([[cos, sin, 0], [-sin, cos, 0], [0, 0, 1.0]])  # image y points down
    scale = np.diag([out_w / size[0], out_h / size[1], 1.0])
    place = np.array([[1.0, 0, out_w / 2.0], [0, 1.0, out_h / 2.0], [0, 0, 1.0]])
    mirror = np.array([[-1.0, 0, out_w], [0, 1.0, 0], [0, 0, 1.0]]) if flip else np.eye(3)
    return np.linalg.inv(shift) @ mirror @ place @ scale @ rotate @ to_origin @ shift


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points`` (N, 2) mapped by a 3x3 affine ``matrix``."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:2, :2].T + matrix[:2, 2]


def warp_image(image: Any, matrix: np.ndarray, out_hw: tuple[int, int]) -> Any:
    """The crop of PIL ``image`` under ``matrix`` (from ``crop_affine``), bilinear, black outside."""
    from PIL import Image

    # PIL samples input (corner convention) at inverse(output pixel centre); convert our centre convention
    to_corner = np.array([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1.0]])
    inverse = to_corner @ np.linalg.inv(matrix) @ np.linalg.inv(to_corner)
    coeffs = tuple(inverse[:2].ravel())
    return image.transform((out_hw[1], out_hw[0]), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)


# --- the crop dataset ------------------------------------------------------------------------------


@dataclass
class CropSettings:
    img_size: tuple[int, int]  # (height, width) of the network input
    stride: int = 4  # input pixels per heatmap pixel
    sigma: float = 2.0
    padding: float = BOX_PADDING
    flip_prob: float = 0.5
    scale_factor: float = 0.35  # random scale in [1 - f, 1 + f] (normal, clipped)
    rotation_factor: float = 40.0  # random rotation in degrees (normal, clipped to 2x), applied with rotation_prob
    rotation_prob: float = 0.6
    udp: bool = False  # UDP's unit-length heatmap mapping instead of the stride mapping
    # Half-body augmentation (ViTPose's TopDownHalfBodyTransform): with this probability, a person with more than
    # half_body_min_joints labelled joints is cropped around its upper or lower body only. 0 = off.
    half_body_prob: float = 0.0
    half_body_min_joints: int = 8

    @property
    def udp_scale(self) -> tuple[float, float] | None:
        return udp_scale(self.img_size, self.stride) if self.udp else None


def half_body_box(
    keypoints: np.ndarray | None, aspect_hw: float, settings: CropSettings, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray] | None:
    """(centre, (w, h)) around the upper or the lower body's labelled joints, or None (no half-body this time).

    As mmpose's ``TopDownHalfBodyTransform``: applied with ``half_body_prob`` to people with more than
    ``half_body_min_joints`` labelled joints; the upper body is taken when a standard normal draw is below 0.5
    (the reference's ``np.random.randn() < 0.5``, p ~ 0.69) and it has more than 2 joints, else the lower body
    when it has more than 2, else the upper; the joints' extent grown to the input aspect and scaled 1.5.
    """
    if keypoints is None:
        return None
    visible = keypoints[:, 2] > 0
    if visible.sum() <= settings.half_body_min_joints or rng.random() >= settings.half_body_prob:
        return None
    upper = np.zeros(len(keypoints), bool)
    upper[list(UPPER_BODY)] = True
    upper_xy, lower_xy = keypoints[visible & upper, :2], keypoints[visible & ~upper, :2]
    if rng.standard_normal() < 0.5 and len(upper_xy) > 2:
        chosen = upper_xy
    elif len(lower_xy) > 2:
        chosen = lower_xy
    else:
        chosen = upper_xy
    if len(chosen) < 2:
        return None
    center = chosen.mean(axis=0)
    w, h = chosen.max(axis=0) - chosen.min(axis=0)
    if w * aspect_hw > h:
        h = w * aspect_hw
    else:
        w = h / aspect_hw
    return center, np.array([w, h]) * HALF_BODY_PADDING


class PoseCrops(torch.utils.data.Dataset):
    """PersonBox list -> (normalised crop, (heatmaps, target weights) or 0, index); train=True augments."""

    def __init__(
        self,
        people: Sequence[PersonBox],
        settings: CropSettings,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        seed: int = 0,
    ) -> None:
        self.people, self.settings, self.train, self.seed = list(people), settings, train, seed
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.epoch = 0
        self.flip_perm = flip_permutation()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.people)

    def box(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(centre, (width, height)) of person ``index``'s crop before augmentation."""
        s = self.settings
        return box_to_center_size(self.people[index].bbox, s.img_size[0] / s.img_size[1], s.padding)

    def affine(self, index: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, bool]:
        """(image -> crop matrix, flipped?) of person ``index``; random augmentation when ``rng`` is given."""
        s = self.settings
        center, size = self.box(index)
        rotation, flip = 0.0, False
        if rng is not None and s.half_body_prob > 0:
            half = half_body_box(self.people[index].keypoints, s.img_size[0] / s.img_size[1], s, rng)
            if half is not None:
                center, size = half
        if rng is not None:
            size = size * float(np.clip(rng.normal() * s.scale_factor + 1, 1 - s.scale_factor, 1 + s.scale_factor))
            if rng.random() < s.rotation_prob:
                rotation = float(
                    np.clip(rng.normal() * s.rotation_factor, -2 * s.rotation_factor, 2 * s.rotation_factor)
                )
            flip = bool(rng.random() < s.flip_prob)
        return crop_affine(center, size, tuple(s.img_size), rotation_deg=rotation, flip=flip), flip

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any, int]:
        from PIL import Image

        person = self.people[index]
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        matrix, flip = self.affine(index, rng)
        try:
            with Image.open(person.path) as img:
                crop = warp_image(img.convert("RGB"), matrix, tuple(self.settings.img_size))
        except OSError as exc:
            raise ClaspError(f"cannot read image {person.path}: {exc}") from None
        tensor = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
        tensor = (tensor - self.mean) / self.std
        if not self.train:
            return tensor, 0, index
        kps = person.keypoints
        if flip:
            kps = kps[self.flip_perm]
        joints = to_heatmap_coords(
            apply_affine(matrix, kps[:, :2]), self.settings.stride, udp_scale=self.settings.udp_scale
        )
        h, w = self.settings.img_size
        hm_hw = (h // self.settings.stride, w // self.settings.stride)
        targets, weights = encode_heatmaps(joints, kps[:, 2] > 0, hm_hw, self.settings.sigma)
        return tensor, (torch.from_numpy(targets), torch.from_numpy(weights)), index
