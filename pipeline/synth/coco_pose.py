"""The synthetic world as a COCO person-keypoints dataset (the real layout, read by ``transfer.pose``).

    coco/annotations/person_keypoints_{train2017,val2017}.json
    coco/{train2017,val2017}/<12-digit image id>.jpg

Each image is a multi-person street scene of ``pipeline.synth.crowd.compose_scene`` seen by a camera of
group 3 (distinct from the re-ID and attribute cameras). Annotations follow COCO exactly: per person
``keypoints`` [x, y, v] * 17 (v = 0 not labelled with x = y = 0, 1 labelled but hidden, 2 visible),
``num_keypoints`` (count of v > 0), ``bbox`` [x, y, w, h] and ``area`` of the *visible* segment (COCO boxes
enclose the segmentation), ``segmentation`` as an uncompressed RLE of the visible pixels, ``iscrowd`` 0,
``category_id`` 1. Groups of distant people too small to annotate become ``iscrowd: 1`` regions with
``num_keypoints: 0``, which COCOeval ignores as it does on the real set. People hidden completely are not
annotated. Image ids are unique across both splits, as in COCO 2017.

The folder is built beside ``out_dir`` under a temporary name and renamed into place when complete, so a
partial dataset is never mistaken for a finished one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.formats import atomic_dir
from pipeline.synth.crowd import Scene, compose_scene
from pipeline.synth.scene import make_camera

CAMERA_GROUP = 3
SPLITS = ("train2017", "val2017")
KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)  # fmt: skip
# COCO's person skeleton: limbs as 1-based keypoint index pairs, as in person_keypoints_*.json.
SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9), (8, 10), (9, 11),
    (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)  # fmt: skip
PERSON_CATEGORY = {
    "supercategory": "person",
    "id": 1,
    "name": "person",
    "keypoints": list(KEYPOINT_NAMES),
    "skeleton": [list(limb) for limb in SKELETON],
}


def annotation_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"person_keypoints_{split}.json"


def write_coco_pose(
    out_dir: Path,
    *,
    seed: int,
    train_images: int = 256,
    val_images: int = 64,
    height: int = 256,
    width: int = 384,
    cameras: int = 8,
    extra: tuple[int, int] = (1, 4),
    min_person: int = 36,
) -> Path:
    """Write ``train_images`` + ``val_images`` COCO-keypoints scenes of ``height`` x ``width`` to ``out_dir``.

    ``cameras`` cameras of group 3 are shared by both splits (COCO's splits are one distribution);
    ``extra`` is the (min, max) number of people per scene; people shorter than ``min_person`` pixels
    are not drawn as annotated people. Deterministic in all arguments. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        image_id, ann_id = 1, 1
        for split, count in zip(SPLITS, (train_images, val_images), strict=True):
            (tmp / split).mkdir(parents=True)
            images, annotations = [], []
            for _ in range(count):
                camera = make_camera(seed, image_id % max(1, cameras), group=CAMERA_GROUP)
                scene = compose_scene(
                    seed * 1_000_003 + image_id, camera, height=height, width=width, extra=extra, min_person=min_person
                )
                file_name = f"{image_id:012d}.jpg"
                Image.fromarray(scene.rgb).save(tmp / split / file_name, quality=camera.jpeg_quality)
                images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
                new = scene_annotations(scene, image_id=image_id, first_id=ann_id)
                annotations += new
                ann_id += len(new)
                image_id += 1
            record = {
                "info": {"description": f"CLASP synthetic world, COCO person keypoints ({split}), seed {seed}"},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": [PERSON_CATEGORY],
            }
            path = annotation_path(tmp, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
    return out_dir


def scene_annotations(scene: Scene, *, image_id: int, first_id: int) -> list[dict]:
    """COCO person annotations of ``scene``: one per visible person, then one ``iscrowd`` per ignore region."""
    height, width = scene.instance.shape
    annotations = []
    for index, person in enumerate(scene.persons):
        if person.area == 0:
            continue  # completely hidden: COCO annotates what can be seen
        kps = np.asarray(person.keypoints, dtype=np.float64).copy()
        kps[kps[:, 2] == 0, :2] = 0.0
        annotations.append(
            {
                "id": first_id + len(annotations),
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": 0,
                "keypoints": [round(float(v), 2) if i % 3 != 2 else int(v) for i, v in enumerate(kps.ravel())],
                "num_keypoints": int((kps[:, 2] > 0).sum()),
                "bbox": [float(v) for v in person.vis_bbox],
                "area": float(person.area),
                "segmentation": _rle(scene.instance == index),
            }
        )
    for box in scene.ignore:
        x, y, w, h = box
        mask = np.zeros((height, width), bool)
        mask[int(y) : int(y + h), int(x) : int(x + w)] = True
        annotations.append(
            {
                "id": first_id + len(annotations),
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": 1,
                "keypoints": [0] * 51,
                "num_keypoints": 0,
                "bbox": [float(v) for v in box],
                "area": float(w * h),
                "segmentation": _rle(mask),
            }
        )
    return annotations


def _rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE: run lengths of the column-major mask, starting with a run of zeros."""
    flat = np.asarray(mask, bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}
