"""Rendering one pedestrian crop with ground truth: RGB, part mask and COCO keypoints.

``render_shot`` is deterministic in its inputs (a look, a camera, a shot and a size). A ``Shot`` holds
everything that changes from one image of a person to the next: view, walking phase, where the box
sits around the person (detector boxes are loose or misaligned), what stands in front. ``advance_shot``
moves a shot by one video frame, which is how a track yields LUPerson-like near-duplicates.

Keypoint visibility follows COCO: 2 visible, 1 inside the crop but hidden (behind the body, another
object or person), 0 outside the crop (x = y = 0). A joint is visible when the topmost shape at its
pixel (floor of x, y) belongs to the joint's own body segment, or to clothing worn over it on the
camera side (a shirt over the hip, hair over an ear).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageChops, ImageFilter

import pipeline.synth.pen as pen
from pipeline.synth.body import draw_person
from pipeline.synth.canvas import Canvas
from pipeline.synth.look import HAIR_COLORS, Look, random_look
from pipeline.synth.pose import COCO_KEYPOINTS, skeleton
from pipeline.synth.scene import Camera, background_window

OCCLUDERS = ("pole", "bin", "car", "railing", "bush", "person")


@dataclass(frozen=True)
class Shot:
    """Everything about one image of a person except the person and the camera."""

    view: str  # front | back | side
    facing: int  # side views: -1 toward image-left, +1 toward image-right
    phase: float  # walking phase, radians
    stride: float  # 0 standing .. 1 full stride
    fill: float  # standing height / crop height
    dx: float  # body centre offset from the crop centre, fraction of the width
    top: float  # head top row, fraction of the height (negative: the box cuts the head)
    scene_x: float  # where in the scene the person stands, 0..1 across
    depth: float  # 0 far from the camera .. 1 near
    brightness: float
    occluder: str | None
    occ_pos: float  # 0..1 placement parameter of the occluder
    other_seed: int | None  # a second person behind, partly visible at the side
    other_dx: float
    seed: int  # pose jitter and sensor noise


@dataclass
class Sample:
    rgb: np.ndarray  # HxWx3 uint8
    part_mask: np.ndarray  # HxW uint8, class ids of data_manifests/parts.yaml
    keypoints: np.ndarray  # 17x3 float32: x, y (pixels), visibility 0/1/2
    view: str
    lip_mask: np.ndarray | None = None  # HxW uint8, LIP's 20 classes, this person only (see lip_classes)


def random_shot(rng: np.random.Generator, camera: Camera, *, aligned: bool = False) -> Shot:
    """A random image of someone seen by ``camera``; ``aligned`` gives a well-centred, unoccluded box."""
    view = ("front", "back", "side")[min(2, int(np.searchsorted(np.cumsum(camera.view_p), rng.random())))]
    standing = rng.random() < 0.15
    loose = not aligned and rng.random() < 0.12  # a loose or shifted detector box
    occluder = None
    if not aligned and rng.random() < 0.2:
        occluder = OCCLUDERS[int(rng.integers(len(OCCLUDERS)))]
    other = int(rng.integers(2**31)) if (not aligned and rng.random() < 0.1) else None
    return Shot(
        view=view,
        facing=1 if rng.random() < 0.5 else -1,
        phase=float(rng.uniform(0, 2 * math.pi)),
        stride=0.0 if standing else float(rng.uniform(0.55, 1.0)),
        fill=float(rng.uniform(0.84, 0.94) if not loose else rng.uniform(0.7, 1.05)),
        dx=float(rng.normal(0, 0.03) if not loose else rng.normal(0, 0.12)),
        top=float(rng.uniform(0.02, 0.07) if not loose else rng.uniform(-0.08, 0.2)),
        scene_x=float(rng.uniform(0.05, 0.95)),
        depth=float(rng.uniform(0.0, 1.0)),
        brightness=float(rng.uniform(0.88, 1.1)),
        occluder=occluder,
        occ_pos=float(rng.uniform(0, 1)),
        other_seed=other,
        other_dx=float((1 if rng.random() < 0.5 else -1) * rng.uniform(0.42, 0.62)),
        seed=int(rng.integers(2**31)),
    )


def advance_shot(shot: Shot, rng: np.random.Generator) -> Shot:
    """The next frame of the same track: a little further in the walk, the box slightly moved."""
    walk = 0.004 * shot.facing if shot.view == "side" else 0.0
    return replace(
        shot,
        phase=shot.phase + float(rng.uniform(0.25, 0.5)),
        fill=float(np.clip(shot.fill * rng.uniform(0.98, 1.02), 0.6, 1.1)),
        dx=shot.dx + float(rng.normal(0, 0.012)),
        top=shot.top + float(rng.normal(0, 0.006)),
        scene_x=float(np.clip(shot.scene_x + walk, 0, 1)),
        seed=int(rng.integers(2**31)),
    )


@functools.lru_cache(maxsize=4096)
def _look_palette(look: Look) -> np.ndarray:
    """Colours of ``look``'s materials (rows = material ids), cached: a person is rendered many times."""
    out = np.zeros((pen.OTHER, 3), np.float32)
    c = look.rgb
    skin = np.asarray(look.skin, np.float32)
    rows = {
        pen.SKIN_FACE: skin,
        pen.SKIN_ARM: skin * 0.97,
        pen.SKIN_LEG: skin * 0.95,
        pen.HAIR: np.asarray(HAIR_COLORS[look.hair_color], np.float32),
        pen.HAT: c(look.hat_color),
        pen.TOP: c(look.top_color),
        pen.TOP2: c(look.top_color2),
        pen.COAT: c(look.coat_color),
        pen.LOWER: c(look.lower_color) * (0.92 if look.jeans else 1.0),
        pen.LOWER2: c(look.lower_color2),
        pen.SHOE: c(look.shoe_color),
        pen.SOLE: c(look.shoe_color) * 0.55 + 60,
        pen.BAG: c(look.bag_color),
        pen.BAG2: c(look.bag_color) * 0.8,
        pen.STRAP: c(look.bag_color) * 0.7,
        pen.GLASSES: np.array((20, 20, 24) if look.glasses == "sunglasses" else (60, 56, 54), np.float32),
        pen.FACE_DETAIL: skin * 0.35,
        pen.LOGO: c(look.top_color2),
        pen.OBJECT: c(look.object_color),
        pen.SCALP: skin * 0.96,
    }
    for material, rgb in rows.items():
        out[material] = np.clip(rgb, 0, 255)
    out.setflags(write=False)
    return out


def _table(values: np.ndarray) -> np.ndarray:
    out = np.zeros(256, np.uint8)
    out[: len(values)] = values
    return out


_MATERIAL_IDS = np.arange(pen.NUM_MATERIALS)
_IS_SHADOW = _table((_MATERIAL_IDS == pen.SHADOW) * 255)
_IS_FG = _table(((_MATERIAL_IDS > 0) & (_MATERIAL_IDS != pen.SHADOW)) * 255)
_SHADOW_RGB = Image.new("RGB", (1, 1), (158, 158, 158))  # ground shadow: 62% of the light
_EDGE_LUT = _table(np.r_[0, np.full(255, 42)])  # darken the outline of every shape against what lies behind it


NOISE_LEVELS = (2.0, 4.0, 6.0)  # grey levels; a camera uses the nearest


@functools.lru_cache(maxsize=len(NOISE_LEVELS))
def _noise_tile(noise: float) -> Image.Image:
    """Grey sensor noise (128 = none), shared by all crops; each crop takes a random window of it."""
    rng = np.random.default_rng(int(noise * 1000))
    tile = np.clip(128 + rng.standard_normal((512, 512), dtype=np.float32) * noise, 0, 255).astype(np.uint8)
    return Image.fromarray(tile).convert("RGB")


def _noise(noise: float, height: int, width: int, rng: np.random.Generator) -> Image.Image:
    tile = _noise_tile(min(NOISE_LEVELS, key=lambda level: abs(level - noise)))
    if height > tile.height or width > tile.width:
        return tile.resize((width, height), Image.Resampling.NEAREST)
    x, y = int(rng.integers(0, tile.width - width + 1)), int(rng.integers(0, tile.height - height + 1))
    return tile.crop((x, y, x + width, y + height))


def _patterns(look: Look, mat: np.ndarray, base: Image.Image, pal: np.ndarray, unit: float, top: float) -> Image.Image:
    """Stripes, plaid and printed trousers, painted on the garment's pixels."""
    if look.top_pattern not in ("stripes", "plaid") and look.lower_pattern != "pattern":
        return base
    rgb = np.array(base)
    yy = np.arange(mat.shape[0], dtype=np.float32)[:, None]
    xx = np.arange(mat.shape[1], dtype=np.float32)[None, :]
    if look.top_pattern in ("stripes", "plaid"):
        sel = mat == pen.TOP
        period = max(2.0, 0.03 * unit)
        line = pal[pen.TOP2].astype(np.float32)
        if look.top_pattern == "stripes":
            rows = (np.floor((yy - top) / period).astype(np.int32) & 1).astype(bool)
            rgb[sel & rows] = line
        else:
            p2 = period * 1.6
            hb = ((yy - top) % p2) < p2 * 0.3
            vb = (xx % p2) < p2 * 0.3
            one = sel & (hb ^ vb)
            rgb[one] = (rgb[one] * 0.45 + line * 0.55).astype(np.uint8)
            rgb[sel & hb & vb] = (line * 0.8).astype(np.uint8)
    if look.lower_pattern == "pattern":
        sel = mat == pen.LOWER
        period = max(3.0, 0.035 * unit)
        dots = (np.sin(xx * (6.283 / period)) * np.sin((yy - top) * (6.283 / period))) > 0.55
        rgb[sel & dots] = pal[pen.LOWER2]
    return Image.fromarray(rgb)


_OCC_COLOURS = {
    "pole": ((92, 96, 100), (60, 62, 66), (0, 0, 0)),
    "bin": ((48, 96, 60), (36, 70, 44), (0, 0, 0)),
    "car": ((150, 30, 34), (52, 60, 70), (200, 200, 200)),
    "railing": ((70, 74, 80), (110, 112, 116), (0, 0, 0)),
    "bush": ((60, 108, 54), (44, 84, 40), (0, 0, 0)),
}


def _occluder(cv: Canvas, kind: str, pos: float, h: int, w: int) -> None:
    a, b = pen.OCC_A, pen.OCC_B
    if kind == "pole":
        x, half = pos * w, w * 0.045
        cv.rectangle((x - half, -1, x + half, h + 1), a, "occ")
    elif kind == "bin":
        x, half = pos * w, w * 0.2
        cv.rectangle((x - half, h * 0.74, x + half, h + 1), a, "occ")
        cv.rectangle((x - half * 1.08, h * 0.72, x + half * 1.08, h * 0.76), b, "occ")
    elif kind == "car":
        y = h * (0.62 + 0.12 * pos)
        left = pos < 0.5
        x0, x1 = (-2, w * 0.75) if left else (w * 0.25, w + 2)
        cv.polygon([(x0, y), (x1, y + h * 0.03), (x1, h + 1), (x0, h + 1)], a, "occ")
        cv.polygon([(x0, y - h * 0.06), (x1 - w * 0.2 if left else x1, y - h * 0.05), (x1, y), (x0, y)], b, "occ")
    elif kind == "railing":
        for frac in (0.58 + 0.1 * pos, 0.74 + 0.1 * pos):
            cv.line([(-1, h * frac), (w + 1, h * frac)], max(1.5, h * 0.018), a, "occ")
        for x in np.arange(pos * w * 0.3, w, w * 0.33):
            cv.rectangle((x - w * 0.015, h * (0.58 + 0.1 * pos), x + w * 0.015, h + 1), b, "occ")
    elif kind == "bush":
        for k in range(5):
            x = w * (k / 4.0) + (pos - 0.5) * w * 0.3
            r = w * (0.18 + 0.04 * ((k * 7) % 3))
            cv.ellipse((x, h * 0.95), r, r * 0.9, a if k % 2 else b, "occ")


def render_shot(look: Look, camera: Camera, shot: Shot, height: int, width: int) -> Sample:
    """Render ``look`` as seen by ``camera`` in ``shot`` at ``height`` x ``width`` pixels."""
    rng = np.random.default_rng(shot.seed)
    unit = shot.fill * height
    top, cx = shot.top * height, width * (0.5 + shot.dx)
    jitter = rng.normal(0, 0.006, (17, 2)) * (shot.stride > 0)
    sk = skeleton(look, shot.view, shot.facing, shot.phase, shot.stride, cx=cx, top=top, height_px=unit, jitter=jitter)
    cv = Canvas(height, width, light_dx=camera.light_dx)
    palette = np.zeros((pen.NUM_MATERIALS, 3), np.float32)
    palette[: pen.OTHER] = _look_palette(look)
    other = None
    if shot.other_seed is not None or shot.occluder == "person":
        orng = np.random.default_rng(shot.other_seed if shot.other_seed is not None else shot.seed + 1)
        other = random_look(orng)
        palette[pen.OTHER : 2 * pen.OTHER] = _look_palette(other)
        o_view = ("front", "back", "side")[int(orng.integers(3))]
        o_unit = unit * float(orng.uniform(0.9, 1.15))
        o_sk = skeleton(other, o_view, int(orng.choice((-1, 1))), float(orng.uniform(0, 6.3)), 0.8,
                        cx=width * (0.5 + shot.other_dx), top=top + unit - o_unit, height_px=o_unit)  # fmt: skip
    if other is not None and shot.occluder != "person":
        draw_person(cv, other, o_sk, offset=pen.OTHER, tag="other")
    draw_person(cv, look, sk)
    if shot.occluder == "person" and other is not None:
        draw_person(cv, other, o_sk, offset=pen.OTHER, tag="other")
    elif shot.occluder is not None:
        for k, rgb in enumerate(_OCC_COLOURS[shot.occluder]):
            palette[pen.OCC_A + k] = rgb
        _occluder(cv, shot.occluder, shot.occ_pos, height, width)

    # Composition: byte table lookups in numpy, per-pixel colour work in PIL's C loops.
    materials = np.zeros(256, np.uint8)
    materials[: len(cv.materials)] = cv.materials
    sid = np.asarray(cv.sid)
    mat = np.take(materials, sid)
    # the camera's colour cast and exposure (already in its scene), times this person's light
    light = np.asarray(camera.cast, np.float32) * (camera.gain * shot.brightness * 1.06)
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(palette)] = np.clip(palette * light, 0, 255)
    base = Image.frombytes("P", (width, height), mat.tobytes())
    base.putpalette(pal.tobytes())
    base = _patterns(look, mat, base.convert("RGB"), pal, unit, top)
    shade = cv.shade.resize((width, height), Image.Resampling.BILINEAR)
    edges = cv.sid.filter(ImageFilter.FIND_EDGES)
    shade = ImageChops.subtract(shade, Image.fromarray(np.take(_EDGE_LUT, np.asarray(edges))))
    person = ImageChops.multiply(base, shade.convert("RGB"))
    feet_y = top + unit * 0.99
    bg = background_window(camera, height=height, width=width, scene_x=shot.scene_x, depth=shot.depth,
                           person_px=unit, feet_y=feet_y, cx=cx)  # fmt: skip
    shadow = np.take(_IS_SHADOW, mat)
    if shadow.any():
        bg = Image.composite(ImageChops.multiply(bg, _SHADOW_RGB.resize(bg.size)), bg, Image.fromarray(shadow))
    img = Image.composite(person, bg, Image.fromarray(np.take(_IS_FG, mat)))
    img = ImageChops.add(img, _noise(camera.noise, height, width, rng), 1.0, -128)
    if camera.lowres < 1.0:
        small = (max(8, int(width * camera.lowres)), max(8, int(height * camera.lowres)))
        img = img.resize(small, Image.Resampling.BILINEAR).resize((width, height), Image.Resampling.BILINEAR)
    pil = img.filter(ImageFilter.BoxBlur(camera.blur * height / 256.0))
    part_mask = np.take(pen.PART_OF_MATERIAL_256, mat)
    keypoints = _keypoints(sk, sid, cv.tags, height, width)
    lip_mask = np.take(lip_classes(look, cv.materials, cv.tags), sid)
    return Sample(rgb=np.asarray(pil), part_mask=part_mask, keypoints=keypoints, view=shot.view, lip_mask=lip_mask)


# LIP class ids (transfer.parsing.metrics.LIP_CLASSES order) of the materials that have one fixed class.
_LIP_FIXED = {pen.HAT: 1, pen.HAIR: 2, pen.SCALP: 2, pen.TOP: 5, pen.TOP2: 5, pen.LOGO: 5, pen.COAT: 7,
              pen.SKIN_FACE: 13, pen.FACE_DETAIL: 13}  # fmt: skip
_LIP_SIDED = {pen.SKIN_ARM: 14, pen.SKIN_LEG: 16, pen.SHOE: 18, pen.SOLE: 18}  # left id; right = left + 1


def lip_classes(look: Look, materials: list[int], tags: list[str]) -> np.ndarray:
    """Per-shape LIP class (256 entries) of the main person: 0 for background, bags, occluders and other people.

    LIP has no bag class; plain glasses count as face, sunglasses as Sunglasses; shorts and trousers
    are Pants, a skirt is Skirt. Left/right are the person's own sides, as in LIP and COCO.
    """
    out = np.zeros(256, np.uint8)
    lower = 12 if look.lower_type == "skirt" else 9
    for index, (mat, tag) in enumerate(zip(materials, tags, strict=True)):
        if mat in _LIP_FIXED:
            out[index] = _LIP_FIXED[mat]
        elif mat in (pen.LOWER, pen.LOWER2):
            out[index] = lower
        elif mat == pen.GLASSES:
            out[index] = 4 if look.glasses == "sunglasses" else 13
        elif mat in _LIP_SIDED:
            out[index] = _LIP_SIDED[mat] + (1 if tag.startswith("right") else 0)
    return out


# Tags of a joint's own segment, and of clothing that covers it without hiding it (camera side only).
def _own(name: str) -> frozenset[str]:
    if name in ("nose", "left_eye", "right_eye"):
        return frozenset({"face"})
    side, joint = name.split("_", 1)
    segments = {
        "ear": ("ear",), "shoulder": ("uarm",), "elbow": ("uarm", "farm"), "wrist": ("farm", "hand"),
        "hip": ("thigh",), "knee": ("thigh", "shin"), "ankle": ("shin", "foot"),
    }[joint]  # fmt: skip
    return frozenset(f"{side}_{s}" for s in segments)


_COVER = {"ear": {"hair", "scalp", "hat", "face"}, "shoulder": {"hair", "strap"}, "hip": {"torso", "pelvis", "skirt"},
          "knee": {"torso", "skirt"}}  # fmt: skip
OWN_TAGS = {name: _own(name) for name in COCO_KEYPOINTS}
COVER_TAGS = {name: frozenset(_COVER.get(name.split("_", 1)[-1], ())) for name in COCO_KEYPOINTS}


def _keypoints(sk, sid: np.ndarray, tags: list[str], height: int, width: int) -> np.ndarray:  # noqa: ANN001
    out = np.zeros((17, 3), dtype=np.float32)
    far_side = ("left" if sk.near_side() == "right" else "right") if sk.view == "side" else None
    for i, name in enumerate(COCO_KEYPOINTS):
        x, y = (float(v) for v in sk[name])
        if not (0.0 <= x < width and 0.0 <= y < height):
            continue  # outside the crop: (0, 0, 0) as in COCO
        tag = tags[sid[int(y), int(x)]]
        far = (far_side is not None and name.startswith(far_side)) or (
            sk.view == "back" and name in ("nose", "left_eye", "right_eye")
        )
        if far and name.endswith(("_eye", "_ear")):  # the far eye/ear of a profile is behind the head
            visible = False
        else:
            visible = tag in OWN_TAGS[name] or (not far and tag in COVER_TAGS[name])
        out[i] = (x, y, 2.0 if visible else 1.0)
    return out


def render_person(
    rng: np.random.Generator, look: Look, camera: Camera, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random image of ``look`` by ``camera``: (rgb HxWx3 uint8, part_mask HxW uint8, keypoints 17x3)."""
    sample = render_shot(look, camera, random_shot(rng, camera), height, width)
    return sample.rgb, sample.part_mask, sample.keypoints
