"""The synthetic world as a CityPersons pedestrian-detection dataset (the real layout, read by ``transfer.detection``).

    citypersons/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    citypersons/annotations/{train,val}_gt.json

The JSON files are the COCO-style ground truth the official evaluation (cvgroup-njust/CityPersons
``eval_MR_multisetup.py``) and the common training code bases (Pedestron, CSP) read, field for field:
``images`` [{id, im_name, file_name, height, width}] with ids from 1 (``im_name`` is the bare file name as
in the official ``val_gt.json``; ``file_name`` adds the city folder), ``categories`` [{id 1,
pedestrian}], ``annotations`` [{id (from 1), image_id, category_id 1, iscrowd 0, ignore, bbox [x, y, w, h]
full body, vis_bbox [x, y, w, h] visible part, height (= bbox h, px), vis_ratio (visible / full-body
pixels)}]. Annotation id 0 is never used: the official script counts a match to id 0 as a false positive.

Scenes come from ``pipeline.synth.crowd.compose_scene`` with cameras of group 4. As on the real set every
visible person is annotated, small (< 50 px) and heavily occluded ones included: the evaluation setups,
not the file, decide who counts. People hidden completely are not annotated. Groups of distant people
too small to annotate one by one become ignore regions (``ignore: 1``, category 1, so the official
script, which reads category 1 only, treats them as regions where detections are not penalised).
Cityscapes' train and val cities are disjoint; here each city is one camera, and the splits use
different cameras.

The folder is built under a temporary sibling name and renamed into place when complete, so a partial
dataset is never mistaken for a finished one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.errors import ClaspError
from pipeline.formats import atomic_dir
from pipeline.synth.crowd import Scene, compose_scene
from pipeline.synth.scene import make_camera

CAMERA_GROUP = 4
SPLITS = ("train", "val")
# Cityscapes' city names: the 18 training cities and the 3 validation cities.
TRAIN_CITIES = (
    "aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt", "hamburg", "hanover", "jena",
    "krefeld", "monchengladbach", "strasbourg", "stuttgart", "tubingen", "ulm", "weimar", "zurich",
)  # fmt: skip
VAL_CITIES = ("frankfurt", "lindau", "munster")
ANNOTATED_FRAME = 19  # Cityscapes' finely annotated frame is the 20th of each 30-frame snippet
CATEGORIES = [{"id": 1, "name": "pedestrian"}]


def gt_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"{split}_gt.json"


def image_dir(root: Path, split: str) -> Path:
    return Path(root) / "leftImg8bit" / split


def write_citypersons(
    out_dir: Path,
    *,
    seed: int,
    train_images: int = 64,
    val_images: int = 32,
    height: int = 384,
    width: int = 768,
    cities: int = 3,
    extra: tuple[int, int] = (2, 8),
    min_person: int = 36,
) -> Path:
    """Write ``train_images`` + ``val_images`` street scenes of ``height`` x ``width`` to ``out_dir``.

    Each split has ``cities`` cities (one camera of group 4 each; the splits share none) taking turns
    image by image; ``extra`` is the (min, max) number of people per scene and ``min_person`` the
    smallest annotated person height in pixels. Deterministic in all arguments. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if train_images < 1 or val_images < 1 or cities < 1:
        raise ClaspError("write_citypersons needs train_images, val_images and cities of at least 1")
    if cities > len(VAL_CITIES) and cities > len(TRAIN_CITIES):
        raise ClaspError(f"write_citypersons: at most {len(TRAIN_CITIES)} cities per split")
    with atomic_dir(out_dir) as tmp:
        for split, count in zip(SPLITS, (train_images, val_images), strict=True):
            gt = _write_split(tmp, split, count, seed=seed, height=height, width=width, cities=cities,
                              extra=extra, min_person=min_person)  # fmt: skip
            path = gt_path(tmp, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(gt))
    return out_dir


def _city_names(split: str, cities: int) -> list[str]:
    names = TRAIN_CITIES if split == "train" else VAL_CITIES
    return [names[i] if i < len(names) else f"{names[i % len(names)]}{i // len(names)}" for i in range(cities)]


def _write_split(root: Path, split: str, count: int, *, seed: int, height: int, width: int, cities: int,
                 extra: tuple[int, int], min_person: int) -> dict[str, Any]:  # fmt: skip
    offset = 0 if split == "train" else cities  # cameras (cities) differ between the splits
    cameras = [make_camera(seed, offset + c, group=CAMERA_GROUP) for c in range(cities)]
    names = _city_names(split, cities)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for n in range(count):
        city = n % cities
        scene = compose_scene(seed * 1_000_003 + offset * 100_003 + n, cameras[city], height=height, width=width,
                              extra=extra, min_person=min_person)  # fmt: skip
        name = f"{names[city]}_{n // cities:06d}_{ANNOTATED_FRAME:06d}_leftImg8bit.png"
        path = image_dir(root, split) / names[city] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.rgb).save(path)
        image_id = n + 1
        images.append({"id": image_id, "im_name": name, "file_name": f"{names[city]}/{name}",
                       "height": height, "width": width})  # fmt: skip
        for ann in scene_annotations(scene):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def scene_annotations(scene: Scene) -> list[dict[str, Any]]:
    """CityPersons annotation fields (without id / image_id) of a scene's people and ignore regions."""
    out = []
    for person in scene.persons:
        if person.area == 0:  # hidden completely: nothing in the image to annotate
            continue
        out.append(_ann(person.bbox, person.vis_bbox, round(float(person.vis_ratio), 4), ignore=0))
    for region in scene.ignore:
        out.append(_ann(region, region, 1.0, ignore=1))
    return out


def _ann(bbox: tuple[float, ...], vis_bbox: tuple[float, ...], vis_ratio: float, *, ignore: int) -> dict[str, Any]:
    box = [round(float(v), 2) for v in bbox]
    return {
        "category_id": 1,
        "iscrowd": 0,
        "ignore": ignore,
        "bbox": box,
        "vis_bbox": [round(float(v), 2) for v in vis_bbox],
        "height": box[3],
        "vis_ratio": vis_ratio,
    }
