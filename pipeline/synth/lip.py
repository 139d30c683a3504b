"""A synthetic LIP (Look Into Person) human-parsing set in the real dataset's layout.

    from pipeline.synth.lip import write_lip
    write_lip(Path("data/synth/LIP"), seed=0, train_images=600, val_images=150)

Output (``out_dir`` is the LIP root, as ``data_manifests/lip.yaml`` describes)::

    TrainVal_images/{train_images,val_images}/<id>.jpg
    TrainVal_parsing_annotations/{train_segmentations,val_segmentations}/<id>.png   single-channel uint8,
                                                       LIP class ids 0..19 (transfer.parsing.metrics.LIP_CLASSES)
    train_id.txt, val_id.txt                           one id per line, no extension
    lip_synth.json                                     arguments, counts, pixels per class (not in real LIP)

Every image is one person, as LIP's crops are, at a varying size and aspect ratio. Most are single-person
renders (``render_shot``: loose boxes, cut heads, street furniture or a second person in front); a share
are upper-body crops, and a share are cut around one person of a multi-person scene (``compose_scene``)
so that other people overlap them. Only the centre person is labelled: other people, bags and occluders
are background (0), as in LIP. Cameras are group 6 (``make_camera(seed, k, group=6)``), apart from the
re-ID sets'. Classes the synthetic world never draws (Glove, Dress, Socks, Jumpsuits, Scarf) stay absent.

The set is built in a hidden sibling folder and renamed into place at the end, so an interrupted run
never leaves a folder that looks complete; a finished folder with the same arguments is reused.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import ClaspError
from pipeline.formats import atomic_dir
from pipeline.synth.crowd import compose_scene
from pipeline.synth.look import random_look
from pipeline.synth.render import random_shot, render_shot
from pipeline.synth.scene import Camera, make_camera

CAMERA_GROUP = 6
NUM_LIP_CLASSES = 20
SPLITS = {"train": ("train_images", "train_segmentations"), "val": ("val_images", "val_segmentations")}
SUMMARY = "lip_synth.json"


def image_path(root: Path, split: str, image_id: str) -> Path:
    return root / "TrainVal_images" / SPLITS[split][0] / f"{image_id}.jpg"


def label_path(root: Path, split: str, image_id: str) -> Path:
    return root / "TrainVal_parsing_annotations" / SPLITS[split][1] / f"{image_id}.png"


def _size(rng: np.random.Generator, heights: tuple[int, int], aspects: tuple[float, float]) -> tuple[int, int]:
    height = int(round(np.exp(rng.uniform(np.log(heights[0]), np.log(heights[1])))))
    width = int(round(height * rng.uniform(*aspects)))
    return height, max(16, width)


def _single(
    rng: np.random.Generator, camera: Camera, heights: tuple[int, int], aspects: tuple[float, float], upper_body: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One render_shot crop; ``upper_body`` keeps only the top 45-70% of a taller render (LIP's half-body shots)."""
    height, width = _size(rng, heights, aspects)
    keep = float(rng.uniform(0.45, 0.7)) if upper_body else 1.0
    full_height = int(round(height / keep))
    sample = render_shot(random_look(rng), camera, random_shot(rng, camera), full_height, width)
    return sample.rgb[:height], sample.lip_mask[:height]


def _from_scene(
    rng: np.random.Generator, camera: Camera, heights: tuple[int, int], min_person_px: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """A crop around one person of a crowded scene; other people's pixels are background. None if nobody fits."""
    scene_h = int(heights[1] * 1.25)
    scene = compose_scene(
        int(rng.integers(2**31)), camera, height=scene_h, width=scene_h * 2, extra=(3, 7), min_person=min_person_px
    )
    candidates = [
        i for i, p in enumerate(scene.persons) if p.bbox[3] >= min_person_px and p.vis_ratio >= 0.45 and p.area > 0
    ]
    if not candidates:
        return None
    index = candidates[int(rng.integers(len(candidates)))]
    x, y, w, h = scene.persons[index].bbox
    pad_x, pad_y = w * rng.uniform(0.05, 0.4), h * rng.uniform(0.02, 0.12)
    x0, y0 = max(0, int(x - pad_x)), max(0, int(y - pad_y))
    x1, y1 = min(scene_h * 2, int(np.ceil(x + w + pad_x))), min(scene_h, int(np.ceil(y + h + pad_y)))
    lip = np.where(scene.instance == index, scene.lip, 0).astype(np.uint8)
    return scene.rgb[y0:y1, x0:x1], lip[y0:y1, x0:x1]


def _write_image(path: Path, rgb: np.ndarray, quality: int) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="JPEG", quality=quality)
    path.write_bytes(buffer.getvalue())


def write_lip(
    out_dir: Path,
    *,
    seed: int,
    train_images: int = 600,
    val_images: int = 150,
    cameras: int = 12,
    heights: tuple[int, int] = (96, 256),
    aspects: tuple[float, float] = (0.45, 1.0),
    upper_body_p: float = 0.15,
    scene_p: float = 0.25,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic LIP set (real layout) to ``out_dir`` and return it.

    ``heights`` is the (min, max) crop height in pixels (log-uniform), ``aspects`` the width / height
    range; ``upper_body_p`` and ``scene_p`` are the shares of half-body crops and of crops cut from
    multi-person scenes. Deterministic in its arguments. A finished folder with the same arguments is
    returned as is; one with other arguments is an error unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    args = {
        "seed": seed, "train_images": train_images, "val_images": val_images, "cameras": cameras,
        "heights": list(heights), "aspects": list(aspects), "upper_body_p": upper_body_p, "scene_p": scene_p,
    }  # fmt: skip
    if train_images < 1 or val_images < 1 or cameras < 1 or not 16 <= heights[0] <= heights[1]:
        raise ClaspError(f"write_lip: need >= 1 train/val image and camera and 16 <= heights[0] <= heights[1]: {args}")
    if out_dir.exists():
        previous = out_dir / SUMMARY
        if previous.is_file() and json.loads(previous.read_text()).get("args") == args and not overwrite:
            return out_dir
        if any(out_dir.iterdir()) and not overwrite:
            raise ClaspError(f"{out_dir} already holds other data; pass overwrite=True or choose another folder")
    with atomic_dir(out_dir, replace=True) as tmp:  # other data in out_dir was refused above
        cams = [make_camera(seed, k, group=CAMERA_GROUP) for k in range(cameras)]
        class_pixels = {split: np.zeros(NUM_LIP_CLASSES, np.int64) for split in SPLITS}
        counts = {"train": train_images, "val": val_images}
        sources = {"single": 0, "upper_body": 0, "scene": 0}
        number = 0
        for split_index, split in enumerate(SPLITS):
            for folder in (image_path(tmp, split, "x").parent, label_path(tmp, split, "x").parent):
                folder.mkdir(parents=True)
            ids = []
            for i in range(counts[split]):
                rng = np.random.default_rng([seed, CAMERA_GROUP, split_index, i])
                camera = cams[int(rng.integers(cameras))]
                draw, crop = rng.random(), None
                if draw < scene_p:
                    crop = _from_scene(rng, camera, heights, max(48, heights[0]))
                    sources["scene"] += crop is not None
                if crop is None:
                    upper = draw >= 1.0 - upper_body_p
                    crop = _single(rng, camera, heights, aspects, upper)
                    sources["upper_body" if upper else "single"] += 1
                rgb, lip = crop
                number += 1
                image_id = f"{number:06d}_{int(rng.integers(10**6)):06d}"
                _write_image(image_path(tmp, split, image_id), rgb, camera.jpeg_quality)
                Image.fromarray(lip).save(label_path(tmp, split, image_id))
                class_pixels[split] += np.bincount(lip.ravel(), minlength=NUM_LIP_CLASSES)[:NUM_LIP_CLASSES]
                ids.append(image_id)
            (tmp / f"{split}_id.txt").write_text("\n".join(ids) + "\n")
        summary = {
            "dataset": "lip (synthetic)",
            "args": args,
            "counts": counts,
            "sources": sources,
            "class_pixels": {split: values.tolist() for split, values in class_pixels.items()},
        }
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir
