"""``preview.png``: a contact sheet to eyeball the world — each sample as image | part mask | keypoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.formats import atomic_path
from pipeline.synth.plan import Job
from pipeline.synth.render import Sample, render_shot

PART_COLOURS = np.array(
    [(0, 0, 0), (140, 60, 20), (250, 200, 160), (220, 40, 40), (250, 150, 40), (40, 90, 220), (120, 220, 90),
     (160, 40, 200), (40, 220, 220)], dtype=np.uint8,
)  # fmt: skip
# COCO person skeleton (pairs of keypoint indices, 0-based), as in person_keypoints "skeleton".
SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
            (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))  # fmt: skip
TILE_H, TILE_W = 256, 128


def _tiles(sample: Sample) -> list[Image.Image]:
    h, w = sample.part_mask.shape
    img = Image.fromarray(sample.rgb).resize((TILE_W, TILE_H), Image.Resampling.BILINEAR)
    colours = PART_COLOURS[sample.part_mask]
    overlay = (0.35 * sample.rgb + 0.65 * colours).astype(np.uint8)
    mask = Image.fromarray(overlay).resize((TILE_W, TILE_H), Image.Resampling.NEAREST)
    kp_img = img.copy()
    draw = ImageDraw.Draw(kp_img)
    sx, sy = TILE_W / w, TILE_H / h
    kps = sample.keypoints
    for a, b in SKELETON:
        if kps[a, 2] > 0 and kps[b, 2] > 0:
            draw.line([(kps[a, 0] * sx, kps[a, 1] * sy), (kps[b, 0] * sx, kps[b, 1] * sy)], fill=(255, 255, 0), width=1)
    for x, y, v in kps:
        if v == 0:
            continue
        x, y = x * sx, y * sy
        if v == 2:  # visible: filled green; hidden: hollow red
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=(0, 255, 0))
        else:
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), outline=(255, 40, 40))
    return [img, mask, kp_img]


def contact_sheet(samples: list[Sample], columns: int = 4) -> Image.Image:
    """Samples in a grid; each cell is image | part mask over the image | COCO keypoints and skeleton."""
    cell_w = 3 * TILE_W + 8
    rows = (len(samples) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * (TILE_H + 6) + 18), (255, 255, 255))
    for i, sample in enumerate(samples):
        x0, y0 = (i % columns) * cell_w, (i // columns) * (TILE_H + 6)
        for k, tile in enumerate(_tiles(sample)):
            sheet.paste(tile, (x0 + k * TILE_W, y0))
    draw = ImageDraw.Draw(sheet)
    names = ("bg", "head", "face", "upper", "arms", "lower", "legs", "shoes", "acc.")
    for k, name in enumerate(names):
        x = 6 + k * 70
        y = rows * (TILE_H + 6) + 3
        draw.rectangle((x, y, x + 12, y + 12), fill=tuple(int(c) for c in PART_COLOURS[k]), outline=(0, 0, 0))
        draw.text((x + 16, y), name, fill=(0, 0, 0))
    return sheet


def write_preview(path: Path, jobs: list[Job], count: int = 16) -> Path:
    """Render ``count`` jobs spread over ``jobs`` (one per track where possible) into a contact sheet."""
    step = max(1, len(jobs) // count)
    picked = jobs[::step][:count]
    samples = [render_shot(j.look, j.camera, j.shot, j.height, j.width) for j in picked]
    with atomic_path(path) as tmp:
        contact_sheet(samples).save(tmp, format="PNG")
    return Path(path)
