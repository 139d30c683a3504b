"""Multi-crop augmentation that carries the CLIP part map through the same geometry as its image.

One image becomes ``G`` global crops (the model's input size, e.g. 256x128) and ``L`` local
crops (e.g. 128x64), each a random resized crop at a person aspect ratio, optionally flipped,
then colour-jittered, greyed, blurred or solarised (DINO's recipe, as SOLIDER uses it).

The part map is a coarse ``grid_h x grid_w`` grid that covers the *whole* original image (the
labeler resizes the full image to its input size). For every token of a global crop's patch
grid (e.g. 16x8) we take the token's centre, map it back through flip, resize and crop to a
pixel of the original image, and read the label cell under that pixel (nearest neighbour).
Tokens whose centre falls outside the image get class ``-1`` (ignore) and confidence 0. A flip
also renames classes through ``flip_map`` when the vocabulary has left/right classes.

All randomness comes from the ``random.Random`` passed in, never from global state, so a data
stream seeded from (seed, epoch, rank, worker) replays exactly after a resume. Crops are
returned as channels-last uint8 tensors; layout change and normalisation happen on the accelerator
(``pretrain.data.to_model_batch``), which keeps worker CPU time and host-to-device bytes low.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

IGNORE_PART = -1


@dataclass(frozen=True)
class CropBox:
    """A crop of the original image in pixels (may extend past its border) and whether it is mirrored."""

    top: float
    left: float
    height: float
    width: float
    flip: bool = False


@dataclass(frozen=True)
class ViewRecipe:
    """Photometric probabilities of one kind of view (DINO: global 1, global 2, local)."""

    blur_p: float
    solarize_p: float


GLOBAL_RECIPES = (ViewRecipe(blur_p=1.0, solarize_p=0.0), ViewRecipe(blur_p=0.1, solarize_p=0.2))
LOCAL_RECIPE = ViewRecipe(blur_p=0.5, solarize_p=0.0)


def sample_crop_box(
    rng: random.Random,
    image_hw: tuple[int, int],
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip_p: float = 0.5,
) -> CropBox:
    """Random resized crop parameters (Inception-style; ``ratio`` is width/height), plus a random flip.

    Ten tries to find a box of the sampled area and aspect inside the image; otherwise the
    largest centred box whose aspect is clamped to ``ratio``.
    """
    img_h, img_w = image_hw
    area = img_h * img_w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    flip = rng.random() < flip_p
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= img_w and 0 < h <= img_h:
            return CropBox(top=rng.randint(0, img_h - h), left=rng.randint(0, img_w - w), height=h, width=w, flip=flip)
    in_ratio = img_w / img_h
    if in_ratio < ratio[0]:
        w, h = img_w, round(img_w / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = img_h, round(img_h * ratio[1])
    else:
        w, h = img_w, img_h
    return CropBox(top=(img_h - h) // 2, left=(img_w - w) // 2, height=h, width=w, flip=flip)


def crop_image(image: Image.Image, box: CropBox, out_hw: tuple[int, int]) -> Image.Image:
    """Crop ``box`` out of ``image``, resize it (bicubic) to ``out_hw`` and mirror it if ``box.flip``."""
    out = image.resize(
        (out_hw[1], out_hw[0]),
        Image.Resampling.BICUBIC,
        box=(box.left, box.top, box.left + box.width, box.top + box.height),
    )
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if box.flip else out


def crop_part_map(
    part_map: np.ndarray,
    part_conf: np.ndarray,
    box: CropBox,
    image_hw: tuple[int, int],
    token_hw: tuple[int, int],
    flip_map: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The part map and confidence seen by each token of a crop (nearest neighbour at token centres).

    ``part_map``/``part_conf``: (grid_h, grid_w) over the whole original image (conf in 0..1).
    Returns int64 classes (``IGNORE_PART`` outside the image) and float32 confidences (0 there).
    """
    img_h, img_w = image_hw
    grid_h, grid_w = part_map.shape
    tok_h, tok_w = token_hw
    ys = box.top + (np.arange(tok_h) + 0.5) * (box.height / tok_h)
    xs_in_crop = (np.arange(tok_w) + 0.5) * (box.width / tok_w)
    # output column j shows crop column (width - x) after a mirror
    xs = box.left + (box.width - xs_in_crop if box.flip else xs_in_crop)
    row_ok = (ys >= 0) & (ys < img_h)
    col_ok = (xs >= 0) & (xs < img_w)
    rows = np.clip(np.floor(ys * grid_h / img_h).astype(np.int64), 0, grid_h - 1)
    cols = np.clip(np.floor(xs * grid_w / img_w).astype(np.int64), 0, grid_w - 1)
    classes = part_map[rows[:, None], cols[None, :]].astype(np.int64)
    if box.flip and flip_map is not None:
        classes = flip_map[classes]
    conf = part_conf[rows[:, None], cols[None, :]].astype(np.float32)
    inside = row_ok[:, None] & col_ok[None, :]
    return np.where(inside, classes, IGNORE_PART), np.where(inside, conf, 0.0).astype(np.float32)


def photometric(image: Image.Image, rng: random.Random, recipe: ViewRecipe) -> Image.Image:
    """DINO's colour recipe on one view: jitter (p=0.8, random order), greyscale (0.2), blur, solarise."""
    if rng.random() < 0.8:
        ops = [
            lambda im: TF.adjust_brightness(im, rng.uniform(0.6, 1.4)),
            lambda im: TF.adjust_contrast(im, rng.uniform(0.6, 1.4)),
            lambda im: TF.adjust_saturation(im, rng.uniform(0.8, 1.2)),
            lambda im: TF.adjust_hue(im, rng.uniform(-0.1, 0.1)),
        ]
        rng.shuffle(ops)
        for op in ops:
            image = op(image)
    if rng.random() < 0.2:
        image = image.convert("L").convert("RGB")
    if rng.random() < recipe.blur_p:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < recipe.solarize_p:
        image = ImageOps.solarize(image, threshold=128)
    return image


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8 tensor of an RGB PIL image (channels-last: stacking it is a plain copy; the
    accelerator permutes to channels-first for free in ``pretrain.data.to_model_batch``)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8))


def person_ratio(out_hw: Sequence[int]) -> tuple[float, float]:
    """Width/height range around the output aspect (SOLIDER: (0.4, 0.6) for 256x128)."""
    aspect = out_hw[1] / out_hw[0]
    return (0.8 * aspect, 1.2 * aspect)


class MultiCrop:
    """Turns one decoded image + its part map into global crops, local crops and per-token part labels."""

    def __init__(
        self,
        *,
        global_hw: tuple[int, int],
        local_hw: tuple[int, int],
        patch_size: int,
        num_global: int = 2,
        num_local: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        ratio: tuple[float, float] | None = None,
        flip_p: float = 0.5,
        photometric: bool = True,
        flip_map: Sequence[int] | None = None,
    ) -> None:
        if global_hw[0] % patch_size or global_hw[1] % patch_size:
            raise ValueError(f"global crop size {global_hw} is not a multiple of the patch size {patch_size}")
        self.global_hw, self.local_hw = tuple(global_hw), tuple(local_hw)
        self.token_hw = (global_hw[0] // patch_size, global_hw[1] // patch_size)
        self.num_global, self.num_local = num_global, num_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.ratio = tuple(ratio) if ratio else person_ratio(global_hw)
        self.flip_p = flip_p
        self.use_photometric = photometric
        self.flip_map = None if flip_map is None else np.asarray(flip_map, dtype=np.int64)

    def __call__(
        self, image: Image.Image, part_map: np.ndarray, part_conf: np.ndarray, rng: random.Random
    ) -> dict[str, torch.Tensor]:
        """``global_crops`` (G,H,W,3) uint8, ``local_crops`` (L,h,w,3) uint8, ``part_map`` (G,th,tw) int64,
        ``part_conf`` (G,th,tw) float32."""
        image_hw = (image.height, image.width)
        globals_, maps, confs = [], [], []
        for g in range(self.num_global):
            box = sample_crop_box(rng, image_hw, scale=self.global_scale, ratio=self.ratio, flip_p=self.flip_p)
            view = crop_image(image, box, self.global_hw)
            if self.use_photometric:
                view = photometric(view, rng, GLOBAL_RECIPES[g % len(GLOBAL_RECIPES)])
            globals_.append(to_uint8_tensor(view))
            pm, pc = crop_part_map(part_map, part_conf, box, image_hw, self.token_hw, self.flip_map)
            maps.append(torch.from_numpy(pm))
            confs.append(torch.from_numpy(pc))
        locals_ = []
        for _ in range(self.num_local):
            box = sample_crop_box(rng, image_hw, scale=self.local_scale, ratio=self.ratio, flip_p=self.flip_p)
            view = crop_image(image, box, self.local_hw)
            if self.use_photometric:
                view = photometric(view, rng, LOCAL_RECIPE)
            locals_.append(to_uint8_tensor(view))
        empty_local = torch.empty((0, *self.local_hw, 3), dtype=torch.uint8)
        return {
            "global_crops": torch.stack(globals_),
            "local_crops": torch.stack(locals_) if locals_ else empty_local,
            "part_map": torch.stack(maps),
            "part_conf": torch.stack(confs),
        }
