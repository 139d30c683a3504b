"""Multi-person street scenes with full ground truth, for the dense transfer tasks (pose, detection,
person search, parsing).

``compose_scene(seed, camera, ...)`` renders each person as an aligned crop (``render_shot``) at the
size perspective gives their feet row, and pastes them far to near onto the camera's background, so
nearer people hide farther ones. Poles, bins and parked cars may then stand in front. Everything a
benchmark annotates is measured from the pixels, not assumed:

- ``bbox``: the full-body box (every pixel the person was drawn on, hidden or not), as CityPersons'
  full-body annotation; ``vis_bbox`` / ``vis_ratio``: box and fraction of those pixels still visible;
- ``keypoints``: COCO 17x3 in scene pixels; a joint visible in the crop becomes 1 (labelled, hidden)
  when someone or something in front covers its pixel, 0 (x = y = 0) when it falls outside the image;
- ``instance`` (topmost person index per pixel, -1 none), ``parts`` (data_manifests/parts.yaml ids) and
  ``lip`` (LIP's 20 classes) maps of the whole scene;
- ``ignore``: boxes around groups of distant, tiny people that are drawn but not annotated one by one
  (CityPersons' "ignore" regions, COCO's ``iscrowd``).

Deterministic in (seed, camera, arguments). Callers choose who appears (``people``: identity id and
look, for person search) and how many random passers-by are added.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipeline.synth.look import Look, random_look
from pipeline.synth.render import Shot, render_shot
from pipeline.synth.scene import Camera, scene_image

Box = tuple[float, float, float, float]  # x, y, w, h (COCO order, pixels)


@dataclass
class ScenePerson:
    person_id: int  # the caller's identity id; -1 for a random passer-by
    look: Look
    view: str
    bbox: Box  # full body, hidden parts included (clipped to the image)
    vis_bbox: Box  # visible pixels; (0, 0, 0, 0) when fully hidden
    vis_ratio: float  # visible / full-body pixels
    area: int  # visible pixels (COCO ``area`` of the segment)
    keypoints: np.ndarray  # 17x3 float32, COCO visibility in scene pixels


@dataclass
class Scene:
    rgb: np.ndarray  # HxWx3 uint8
    persons: list[ScenePerson]  # annotated people, in drawing order (far to near)
    instance: np.ndarray  # HxW int16: index into ``persons`` of the topmost person, -1 elsewhere
    parts: np.ndarray  # HxW uint8, parts.yaml classes of every annotated person
    lip: np.ndarray  # HxW uint8, LIP classes of every annotated person
    ignore: list[Box]  # regions of unannotated tiny people


def _feet_row(rng: np.random.Generator, horizon: float, height: int, near: float) -> float:
    """A feet row below the horizon; ``near`` in 0..1 biases it toward the bottom of the image."""
    t = float(rng.beta(1.0 + 2.0 * near, 1.5))
    return horizon + (height - horizon) * (0.05 + 0.95 * t)


def _shot(rng: np.random.Generator, camera: Camera) -> Shot:
    view = ("front", "back", "side")[min(2, int(np.searchsorted(np.cumsum(camera.view_p), rng.random())))]
    standing = rng.random() < 0.2
    return Shot(
        view=view, facing=1 if rng.random() < 0.5 else -1, phase=float(rng.uniform(0, 2 * math.pi)),
        stride=0.0 if standing else float(rng.uniform(0.5, 1.0)), fill=0.86, dx=0.0, top=0.04,
        scene_x=0.5, depth=0.5, brightness=float(rng.uniform(0.9, 1.08)), occluder=None, occ_pos=0.0,
        other_seed=None, other_dx=0.0, seed=int(rng.integers(2**31)),
    )  # fmt: skip


def _box(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))


def _occluders(draw: ImageDraw.ImageDraw, rng: np.random.Generator, horizon: float, height: int, width: int,
               count: int) -> None:  # fmt: skip
    """Street furniture in front of everyone: poles, bins, parked cars (drawn with index 255 = not a person)."""
    for _ in range(count):
        kind = ("pole", "bin", "car")[int(rng.integers(3))]
        feet = _feet_row(rng, horizon, height, near=0.8)
        scale = (feet - horizon) / max(1.0, height - horizon)
        x = float(rng.uniform(0, width))
        if kind == "pole":
            w, h = max(2.0, 10 * scale), (feet - horizon) * 1.6
        elif kind == "bin":
            w, h = 50 * scale + 4, 70 * scale + 4
        else:
            w, h = 260 * scale + 10, 90 * scale + 6
        draw.rectangle((x - w / 2, feet - h, x + w / 2, feet), fill=255)


_OCC_RGB = ((86, 90, 96), (60, 66, 62), (150, 40, 40), (40, 60, 120), (200, 200, 196))


def compose_scene(
    seed: int,
    camera: Camera,
    *,
    height: int = 384,
    width: int = 768,
    people: Sequence[tuple[int, Look]] = (),
    extra: tuple[int, int] = (1, 6),
    min_person: int = 36,
    max_person: float = 0.85,
    crowd_p: float = 0.3,
    occluder_p: float = 0.4,
) -> Scene:
    """One scene of ``camera``: the given ``people`` plus ``extra`` (min, max) random passers-by.

    Person heights follow perspective from the camera's horizon and range from ``min_person`` pixels
    to ``max_person`` x ``height``; with probability ``crowd_p`` a group of distant people too small
    to annotate (< ``min_person`` / 2) is added as an ignore region.
    """
    rng = np.random.default_rng([seed, camera.group, camera.index, 0xC20D])
    horizon = camera.horizon * height
    bg = scene_image(camera).resize((width, height), Image.Resampling.BILINEAR)
    rgb = np.array(bg)
    instance = np.full((height, width), -1, np.int16)
    parts = np.zeros((height, width), np.uint8)
    lip = np.zeros((height, width), np.uint8)

    cast = [(pid, look) for pid, look in people]
    cast += [(-1, random_look(rng)) for _ in range(int(rng.integers(extra[0], extra[1] + 1)))]
    span = height * max_person / max(1.0, height - horizon)  # height per row below the horizon at the bottom
    order = _place_cast(rng, cast, horizon, height, width, span, min_person, crowd_p)

    persons: list[ScenePerson] = []
    full_masks: list[tuple[int, np.ndarray]] = []
    crowd_mask = np.zeros((height, width), bool)
    for feet, tall, pid, look, cx in order:
        ch = max(16, int(round(tall / 0.86)))
        cw = max(8, int(round(ch * 0.62)))
        sample = render_shot(look, camera, _shot(rng, camera), ch, cw)
        fg = sample.part_mask > 0
        top = int(round(feet - 0.04 * ch - 0.86 * ch * 0.99))  # crop top so the feet land on ``feet``
        left = int(round(cx - cw / 2))
        y0, y1, x0, x1 = max(0, top), min(height, top + ch), max(0, left), min(width, left + cw)
        if y1 <= y0 or x1 <= x0:
            continue
        sub = fg[y0 - top : y1 - top, x0 - left : x1 - left]
        rgb[y0:y1, x0:x1][sub] = sample.rgb[y0 - top : y1 - top, x0 - left : x1 - left][sub]
        if pid == -2:  # tiny crowd member: pixels only
            crowd_mask[y0:y1, x0:x1] |= sub
            instance[y0:y1, x0:x1][sub] = -1
            parts[y0:y1, x0:x1][sub] = 0
            lip[y0:y1, x0:x1][sub] = 0
            continue
        index = len(persons)
        instance[y0:y1, x0:x1][sub] = index
        parts[y0:y1, x0:x1][sub] = sample.part_mask[y0 - top : y1 - top, x0 - left : x1 - left][sub]
        lip[y0:y1, x0:x1][sub] = sample.lip_mask[y0 - top : y1 - top, x0 - left : x1 - left][sub]
        kps = sample.keypoints.copy()
        kps[:, 0] += left
        kps[:, 1] += top
        persons.append(ScenePerson(pid, look, sample.view, (0, 0, 0, 0), (0, 0, 0, 0), 0.0, 0, kps))
        full = np.zeros((height, width), bool)
        full[y0:y1, x0:x1] = sub
        full_masks.append((index, full))

    # street furniture in front of everyone
    if rng.random() < occluder_p:
        layer = Image.new("L", (width, height), 0)
        _occluders(ImageDraw.Draw(layer), rng, horizon, height, width, int(rng.integers(1, 3)))
        occ = np.asarray(layer) == 255
        rgb[occ] = np.asarray(_OCC_RGB[int(rng.integers(len(_OCC_RGB)))], np.uint8)
        instance[occ], parts[occ], lip[occ] = -1, 0, 0
        crowd_mask &= ~occ

    _finish_persons(persons, full_masks, instance, width, height)
    ignore = [_box(crowd_mask)] if crowd_mask.any() else []
    return Scene(rgb=rgb, persons=persons, instance=instance, parts=parts, lip=lip, ignore=ignore)


def _place_cast(
    rng: np.random.Generator,
    cast: list[tuple[int, Look]],
    horizon: float,
    height: int,
    width: int,
    span: float,
    min_person: int,
    crowd_p: float,
) -> list[tuple[float, float, int, Look, float]]:
    """(feet row, height, pid, look, centre x) of everyone, far first; pid -2 marks the tiny crowd members."""
    # people's feet rows and heights (perspective: height grows linearly below the horizon)
    # people's feet rows and heights (perspective: height grows linearly below the horizon)
    placed = []
    for pid, look in cast:
        for _ in range(20):
            feet = _feet_row(rng, horizon, height, near=0.3)
            tall = (feet - horizon) * span * float(rng.uniform(0.9, 1.08))
            if tall >= min_person:
                break
        else:
            feet, tall = height - 1.0, float(min_person)
        placed.append((feet, tall, pid, look, float(rng.uniform(0.04, 0.96)) * width))
    tiny = []
    if rng.random() < crowd_p:
        cx, n = float(rng.uniform(0.1, 0.9)) * width, int(rng.integers(3, 7))
        tall = float(rng.uniform(8.0, max(9.0, min_person / 2)))
        row = horizon + tall / max(span, 1e-6)
        for _ in range(n):
            x = cx + float(rng.normal(0, tall * 0.6))
            tiny.append((row + float(rng.normal(0, 1)), tall, -2, random_look(rng), x))
    return sorted(placed + tiny, key=lambda p: p[0])  # far (small feet row) first


def _finish_persons(
    persons: list[ScenePerson], full_masks: list[tuple[int, np.ndarray]], instance: np.ndarray, width: int, height: int
) -> None:
    """Boxes, visible area and keypoint visibility of each person once everything in front is drawn."""
    for index, full in full_masks:
        person = persons[index]
        visible = instance == index
        total = int(full.sum())
        person.bbox = _box(full)
        person.vis_bbox = _box(visible)
        person.area = int(visible.sum())
        person.vis_ratio = person.area / total if total else 0.0
        kps = person.keypoints
        for k in range(17):
            x, y, v = kps[k]
            if v == 0:
                continue
            if not (0 <= x < width and 0 <= y < height):
                kps[k] = 0.0
            elif v == 2 and instance[int(y), int(x)] != index:
                kps[k, 2] = 1.0
