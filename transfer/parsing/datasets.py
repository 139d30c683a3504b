"""LIP reader and the CE2P / SCHP geometry: training augmentation, test letterbox, logits back to the label's size.

Layout (``data_manifests/lip.yaml``; ``--data`` is the LIP root)::

    TrainVal_images/{train_images,val_images}/<id>.jpg
    TrainVal_parsing_annotations/{train_segmentations,val_segmentations}/<id>.png   uint8 class ids 0..19
    train_id.txt, val_id.txt                                                         one id per line

CE2P/SCHP's flattened copy (``{train,val}_images/`` and ``{train,val}_segmentations/`` directly in the
root) is read too.

Geometry (CE2P ``_box2cs`` / ``get_affine_transform``, used by SCHP and SOLIDER's parsing code): the whole
image is the person box; the box is widened or heightened to the input's aspect ratio around the image
centre and mapped onto the input, so the image is letterboxed, never distorted. Training draws a zoom
factor clip(N(1, s), 1 - s, 1 + s) of the box (s = 0.25), a rotation clip(N(0, r), -2r, 2r) degrees with
probability 0.6 (r = 30) and a horizontal flip (p = 0.5) that also swaps Left/Right-arm, -leg and -shoe.
Pixels outside the image are the mean colour in the input and 255 (ignored) in the label. Testing uses the
plain letterbox and maps the logits back onto the original label grid through the inverse transform
(bilinear), so scores are computed at each image's own resolution.

Coordinates are continuous: pixel (i, j) covers [j, j + 1) x [i, i + 1), its centre is (j + 0.5, i + 0.5);
PIL's affine transform and ``grid_sample(align_corners=False)`` both use this convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import ClaspError
from transfer.parsing.metrics import LIP_CLASSES

PARSING_DATASETS = ("lip",)
IGNORE_INDEX = 255
LR_PAIRS = ((14, 15), (16, 17), (18, 19))  # (Left-arm, Right-arm), (Left-leg, Right-leg), (Left-shoe, Right-shoe)
_LIP_SPLITS = {"train": ("train_images", "train_segmentations"), "val": ("val_images", "val_segmentations")}


def flip_permutation(num_classes: int = len(LIP_CLASSES)) -> np.ndarray:
    """Class id -> its mirror-image class id (left and right swapped, everything else fixed)."""
    perm = np.arange(num_classes)
    for left, right in LR_PAIRS:
        perm[left], perm[right] = right, left
    return perm


def flip_label(label: np.ndarray) -> np.ndarray:
    """A label map mirrored horizontally with left/right classes swapped (255 stays 255)."""
    table = np.arange(256, dtype=np.uint8)
    table[: len(LIP_CLASSES)] = flip_permutation()
    return table[np.ascontiguousarray(label[:, ::-1])]


# --- the dataset -----------------------------------------------------------------------------------


@dataclass
class ParsingItem:
    image_id: str
    image: str
    label: str


@dataclass
class ParsingData:
    name: str
    root: Path
    layout: str
    classes: tuple[str, ...]
    splits: dict[str, list[ParsingItem]]

    def split(self, name: str) -> list[ParsingItem]:
        if name not in self.splits:
            raise ClaspError(f"{self.name} has no '{name}' split; it has {sorted(self.splits)}")
        return self.splits[name]

    def summary(self) -> dict[str, int]:
        return {"classes": len(self.classes), **{f"{k}_images": len(v) for k, v in self.splits.items()}}


def load_parsing_dataset(name: str, root: str | Path) -> ParsingData:
    """Read dataset ``name`` (``lip``) from its root folder; ClaspError names a missing file and the fix."""
    key = name.lower()
    root = Path(root)
    if key not in PARSING_DATASETS:
        raise ClaspError(f"unknown parsing dataset '{name}': choose one of {', '.join(PARSING_DATASETS)}")
    if not root.is_dir():
        raise ClaspError(f"parsing data folder {root} does not exist (pass --data pointing at the LIP folder)")
    splits = {}
    for split, (image_dir, label_dir) in _LIP_SPLITS.items():
        id_file = root / f"{split}_id.txt"
        if not id_file.is_file():
            raise ClaspError(
                f"{id_file} not found: --data must be the LIP root holding train_id.txt, val_id.txt, "
                "TrainVal_images/ and TrainVal_parsing_annotations/ (data_manifests/lip.yaml)"
            )
        ids = [line.strip() for line in id_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise ClaspError(f"{id_file} lists no image ids")
        nested = (root / "TrainVal_images" / image_dir, root / "TrainVal_parsing_annotations" / label_dir)
        flat = (root / image_dir, root / label_dir)  # CE2P / SCHP's data/LIP after moving the folders up
        images, labels = flat if (flat[0].is_dir() and not nested[0].is_dir()) else nested
        items = [ParsingItem(i, str(images / f"{i}.jpg"), str(labels / f"{i}.png")) for i in ids]
        for path in (items[0].image, items[0].label, items[-1].image, items[-1].label):
            if not Path(path).is_file():
                raise ClaspError(f"{path} (listed in {id_file}) does not exist; is the LIP download complete?")
        splits[split] = items
    nested_layout = Path(splits["train"][0].image).parent.parent.name == "TrainVal_images"
    layout = (
        "LIP TrainVal_images/ + TrainVal_parsing_annotations/, {train,val}_id.txt"
        if nested_layout
        else "LIP flat (CE2P/SCHP): {train,val}_images/ + {train,val}_segmentations/, {train,val}_id.txt"
    )
    return ParsingData(name=key, root=root, layout=layout, classes=LIP_CLASSES, splits=splits)


def read_label(path: str) -> np.ndarray:
    """A LIP label PNG as an (H, W) uint8 array of class ids."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise ClaspError(f"{path} is a {img.mode} image; LIP labels are single-channel class-id PNGs")
            return np.asarray(img if img.mode == "L" else Image.fromarray(np.asarray(img)))
    except OSError as exc:
        raise ClaspError(f"cannot read label {path}: {exc}") from None


def _read_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as exc:
        raise ClaspError(f"cannot read image {path}: {exc}") from None


# --- geometry ----------------------------------------------------------------------------------------


def box_affine(
    height: int, width: int, input_size: tuple[int, int], *, zoom: float = 1.0, rotation_deg: float = 0.0
) -> np.ndarray:
    """3x3 matrix taking image coordinates to input coordinates: the image centred in the input, scaled to fit
    (letterbox), the box ``zoom`` times larger (the person smaller) and rotated by ``rotation_deg``."""
    in_h, in_w = input_size
    scale = min(in_w / width, in_h / height) / zoom
    angle = math.radians(rotation_deg)
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    to_origin = np.array([[1, 0, -width / 2], [0, 1, -height / 2], [0, 0, 1]], np.float64)
    rotate_scale = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], np.float64)
    to_input = np.array([[1, 0, in_w / 2], [0, 1, in_h / 2], [0, 0, 1]], np.float64)
    return to_input @ rotate_scale @ to_origin


def warp(image: Image.Image, matrix: np.ndarray, input_size: tuple[int, int], *, label: bool, fill: Any) -> Image.Image:
    """``image`` resampled onto the input grid by ``matrix`` (image -> input), nearest for labels."""
    inverse = np.linalg.inv(matrix)[:2].ravel()
    resample = Image.Resampling.NEAREST if label else Image.Resampling.BILINEAR
    return image.transform(
        (input_size[1], input_size[0]), Image.Transform.AFFINE, tuple(inverse), resample, fillcolor=fill
    )


def logits_to_original(
    logits: torch.Tensor, matrix: np.ndarray | torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """(C, h_in, w_in) logits on the input grid -> (C, height, width) on the image grid (bilinear, inverse map).

    Each original pixel centre is sent through ``matrix`` (image -> input) and the logits are sampled there,
    which is what CE2P/SCHP ``transform_logits`` does with ``cv2.warpAffine`` and the inverse transform.
    """
    matrix = torch.as_tensor(matrix, dtype=torch.float64)[:2]
    in_h, in_w = logits.shape[-2:]
    ys = torch.arange(height, dtype=torch.float64) + 0.5
    xs = torch.arange(width, dtype=torch.float64) + 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    u = matrix[0, 0] * grid_x + matrix[0, 1] * grid_y + matrix[0, 2]
    v = matrix[1, 0] * grid_x + matrix[1, 1] * grid_y + matrix[1, 2]
    grid = torch.stack((2 * u / in_w - 1, 2 * v / in_h - 1), dim=-1).to(logits.dtype)[None]
    out = F.grid_sample(
        logits[None], grid.to(logits.device), mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[0]


@dataclass
class ParsingAugment:
    scale_factor: float = 0.25
    rotation_deg: float = 30.0
    rotation_p: float = 0.6
    flip_prob: float = 0.5


class ParsingDataset(torch.utils.data.Dataset):
    """Training: (image tensor, label tensor (H, W) int64 with 255 ignored, index), augmented.
    Testing (``augment=None``): (image tensor, {index, height, width, matrix}) with the letterbox transform."""

    def __init__(
        self,
        items: list[ParsingItem],
        input_size: tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: ParsingAugment | None,
        seed: int = 0,
    ) -> None:
        self.items, self.input_size, self.augment, self.seed = items, tuple(input_size), augment, seed
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.fill = tuple(int(round(255 * m)) for m in mean)  # normalises to 0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (array - self.mean) / self.std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any, Any]:
        item = self.items[index]
        image = _read_image(item.image)
        width, height = image.size
        if self.augment is None:
            matrix = box_affine(height, width, self.input_size)
            pixels = warp(image, matrix, self.input_size, label=False, fill=self.fill)
            meta = {"index": index, "height": height, "width": width, "matrix": torch.from_numpy(matrix)}
            return self._to_tensor(pixels), meta
        label = read_label(item.label)
        if label.shape != (height, width):
            raise ClaspError(f"{item.label} is {label.shape[1]}x{label.shape[0]} but {item.image} is {width}x{height}")
        aug = self.augment
        rng = np.random.default_rng([self.seed, self.epoch, index])  # the same with any number of workers
        if rng.random() < aug.flip_prob:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            label = flip_label(label)
        zoom = float(np.clip(rng.normal(1.0, aug.scale_factor), 1 - aug.scale_factor, 1 + aug.scale_factor))
        rotation = 0.0
        if rng.random() < aug.rotation_p:
            rotation = float(np.clip(rng.normal(0.0, aug.rotation_deg), -2 * aug.rotation_deg, 2 * aug.rotation_deg))
        matrix = box_affine(height, width, self.input_size, zoom=zoom, rotation_deg=rotation)
        pixels = warp(image, matrix, self.input_size, label=False, fill=self.fill)
        target = warp(Image.fromarray(label), matrix, self.input_size, label=True, fill=IGNORE_INDEX)
        return self._to_tensor(pixels), torch.from_numpy(np.asarray(target, dtype=np.int64)), index
