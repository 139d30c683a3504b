"""CityPersons reader: the images and the COCO-style ground truth the official evaluation reads.

Layout (the real dataset and ``pipeline.synth.citypersons`` alike)::

    DATA/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png    (Cityscapes images)
    DATA/annotations/{train,val}_gt.json       (also accepted: DATA/{split}_gt.json, DATA/annotations/{split}.json)

The JSON is the official ``val_gt.json`` form (and its train counterpart): ``images`` with ``id``,
``height``, ``width`` and ``file_name`` (relative to ``leftImg8bit/<split>``) or ``im_name`` (bare file
name, the city being its prefix); ``annotations`` with ``id, image_id, category_id, bbox [x, y, w, h]
(full body), height, vis_ratio`` and optionally ``vis_bbox`` and ``ignore``.

Training targets (Pedestron / CSP practice): pedestrians (category 1, ``ignore`` 0) at least
``min_height_px`` tall with ``vis_ratio >= min_vis_ratio`` are positives; every other annotation
(ignore regions, other categories, people outside those ranges) becomes an *ignore box*, which the
detector keeps out of its losses (``transfer.detection.model``). Horizontal flip in training; scale
augmentation is the detector's resize to a random shorter side (``min_size`` as a sequence).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ClaspError

PERSON_CATEGORY_ID = 1
LAYOUT = "CityPersons (leftImg8bit/<split>/<city>/*.png + COCO-style <split>_gt.json)"


def gt_candidates(root: Path, split: str) -> list[Path]:
    return [
        root / "annotations" / f"{split}_gt.json",
        root / f"{split}_gt.json",
        root / "annotations" / f"{split}.json",
    ]


@dataclass
class CityPersonsSplit:
    """One split: the ground-truth dict exactly as read (for the metric) and per-image paths."""

    split: str
    gt_file: Path
    gt: dict[str, Any]
    image_ids: list[Any]  # gt["images"] order
    paths: list[Path]
    annotations: dict[Any, list[dict[str, Any]]]  # image id -> its annotations, file order

    def __len__(self) -> int:
        return len(self.image_ids)

    def summary(self) -> dict[str, Any]:
        anns = [a for group in self.annotations.values() for a in group]
        pedestrians = [a for a in anns if a.get("category_id") == PERSON_CATEGORY_ID and not a.get("ignore", 0)]
        return {
            "split": self.split,
            "images": len(self.image_ids),
            "pedestrians": len(pedestrians),
            "ignore_or_other": len(anns) - len(pedestrians),
            "reasonable": sum(a["height"] >= 50 and a["vis_ratio"] >= 0.65 for a in pedestrians),
            "heavy_occlusion": sum(a["height"] >= 50 and 0.2 <= a["vis_ratio"] <= 0.65 for a in pedestrians),
        }


def load_citypersons(data_dir: str | Path, split: str) -> CityPersonsSplit:
    """Read split ``split`` (train / val) of the CityPersons folder ``data_dir``; errors name the file at fault."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ClaspError(f"CityPersons folder {root} does not exist (expected leftImg8bit/ and annotations/ in it)")
    gt_file = next((p for p in gt_candidates(root, split) if p.is_file()), None)
    if gt_file is None:
        tried = ", ".join(str(p) for p in gt_candidates(root, split))
        raise ClaspError(f"no CityPersons ground truth for split '{split}': tried {tried}")
    try:
        gt = json.loads(gt_file.read_text())
    except json.JSONDecodeError as exc:
        raise ClaspError(f"{gt_file} is not valid JSON: {exc}") from None
    if not isinstance(gt, dict) or "images" not in gt or "annotations" not in gt:
        raise ClaspError(f"{gt_file} is not a COCO-style dict with 'images' and 'annotations'")
    image_root = root / "leftImg8bit" / split
    image_ids, paths = [], []
    for n, image in enumerate(gt["images"]):
        if "id" not in image or not ("file_name" in image or "im_name" in image):
            raise ClaspError(f"{gt_file}: image #{n} needs 'id' and 'file_name' (or 'im_name')")
        path = _image_path(image_root, image)
        if not path.is_file():
            raise ClaspError(f"{gt_file}: image #{n} is missing on disk ({path}); check --data and the split name")
        image_ids.append(image["id"])
        paths.append(path)
    annotations: dict[Any, list[dict[str, Any]]] = {i: [] for i in image_ids}
    for n, ann in enumerate(gt["annotations"]):
        missing = [k for k in ("image_id", "category_id", "bbox") if k not in ann]
        if missing:
            raise ClaspError(f"{gt_file}: annotation #{n} lacks {', '.join(missing)}")
        if ann["image_id"] in annotations:
            annotations[ann["image_id"]].append(ann)
    return CityPersonsSplit(split, gt_file, gt, image_ids, paths, annotations)


def _image_path(image_root: Path, image: dict[str, Any]) -> Path:
    if "file_name" in image:
        path = image_root / image["file_name"]
        if path.is_file() or "im_name" not in image:
            return path
    name = str(image["im_name"])
    return image_root / name.split("_")[0] / name  # Cityscapes names start with their city


def _xyxy(boxes: list[list[float]]) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([arr[:, :2], arr[:, :2] + arr[:, 2:]], axis=1)


def training_boxes(
    anns: list[dict[str, Any]], *, min_height_px: float, min_vis_ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """(positive boxes, ignore boxes), both xyxy float32, of one image's annotations (see the module doc)."""
    positive, ignore = [], []
    for ann in anns:
        is_person = ann["category_id"] == PERSON_CATEGORY_ID and not ann.get("ignore", 0)
        height = ann.get("height", ann["bbox"][3])
        vis = ann.get("vis_ratio", 1.0)
        if is_person and height >= min_height_px and vis >= min_vis_ratio:
            positive.append(ann["bbox"])
        else:
            ignore.append(ann["bbox"])
    return _xyxy(positive), _xyxy(ignore)


def _clip(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    boxes = boxes.copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes[(boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)]


def read_image(path: Path) -> torch.Tensor:
    """(3, H, W) float RGB in 0..1."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except OSError as exc:
        raise ClaspError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class CityPersonsDataset(torch.utils.data.Dataset):
    """``(image 0..1 (3,H,W), target, index)``; target: ``boxes`` / ``ignore_boxes`` xyxy, ``labels``, ``image_id``."""

    def __init__(
        self,
        data: CityPersonsSplit,
        *,
        train: bool,
        flip_prob: float = 0.5,
        min_height_px: float = 50.0,
        min_vis_ratio: float = 0.0,
        skip_empty: bool = False,
    ) -> None:
        self.data, self.train, self.flip_prob = data, train, flip_prob
        self.min_height_px, self.min_vis_ratio = min_height_px, min_vis_ratio
        self.indices = list(range(len(data)))
        if skip_empty:  # images without a single positive teach little and cost a full forward pass
            self.indices = [i for i in self.indices if len(self._boxes(i)[0])]

    def _boxes(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        anns = self.data.annotations[self.data.image_ids[i]]
        return training_boxes(anns, min_height_px=self.min_height_px, min_vis_ratio=self.min_vis_ratio)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        i = self.indices[index]
        image = read_image(self.data.paths[i])
        height, width = image.shape[-2:]
        positive, ignore = (_clip(b, width, height) for b in self._boxes(i))
        if self.train and torch.rand(()) < self.flip_prob:
            image = image.flip(-1)
            positive = np.stack([width - positive[:, 2], positive[:, 1], width - positive[:, 0], positive[:, 3]], 1)
            ignore = np.stack([width - ignore[:, 2], ignore[:, 1], width - ignore[:, 0], ignore[:, 3]], 1)
        target = {
            "boxes": torch.from_numpy(np.ascontiguousarray(positive, dtype=np.float32)).reshape(-1, 4),
            "labels": torch.ones(len(positive), dtype=torch.int64),
            "ignore_boxes": torch.from_numpy(np.ascontiguousarray(ignore, dtype=np.float32)).reshape(-1, 4),
            "image_id": torch.tensor(i, dtype=torch.int64),  # position in the split (ids may be any JSON value)
        }
        return image, target, index


def collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor], int]]) -> tuple[torch.Tensor, list, torch.Tensor]:
    """Images zero-padded (bottom/right) to one (B, 3, H, W) tensor; targets as a list; dataset indices."""
    height = max(item[0].shape[1] for item in batch)
    width = max(item[0].shape[2] for item in batch)
    images = torch.zeros(len(batch), 3, height, width)
    for n, (image, _, _) in enumerate(batch):
        images[n, :, : image.shape[1], : image.shape[2]] = image
    return images, [item[1] for item in batch], torch.tensor([item[2] for item in batch])
