"""Cameras and the places they watch: a background scene per camera plus its imaging character.

Each camera renders one wide scene once (cached per process): buildings, shop windows or trees above a
ground plane in perspective (pavement tiles, asphalt with a zebra crossing, grass and a path, an indoor
floor). A crop's background is the window of that scene around where the person stands, so people
near the camera show coarse ground texture and people far away stand in front of facades. Lighting,
colour cast, blur, resolution, sensor noise and JPEG quality are per camera, as in real surveillance
footage where every camera has its own look.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SCENE_H, SCENE_W = 360, 720
KINDS = ("street", "shopfront", "park", "plaza", "indoor", "crossing")
WALLS = ((196, 178, 150), (170, 168, 160), (150, 82, 62), (222, 216, 200), (120, 110, 100), (205, 190, 160),
         (96, 108, 120), (184, 150, 120))  # fmt: skip


@dataclass(frozen=True)
class Camera:
    """One camera: the scene it watches and how it images it."""

    seed: int
    group: int  # which set of cameras: 0 LUPerson-like videos, 1 Market-1501, 2 PA-100K
    index: int
    kind: str
    horizon: float  # horizon row as a fraction of the scene height
    base: float  # row where facades meet the ground, fraction of the scene height
    person_scale: float  # person height in scene pixels per pixel of distance below the horizon
    cast: tuple[float, float, float]  # per-channel gain (white balance)
    gain: float
    light_dx: float  # -1 light from image-left .. +1 from image-right
    blur: float  # Gaussian sigma at a 256-pixel-high crop
    lowres: float  # 1 = full resolution; 0.5 = the sensor sees half the pixels
    noise: float  # sensor noise (grey levels)
    jpeg_quality: int
    view_p: tuple[float, float, float]  # how often it sees people from the front / back / side


def make_camera(seed: int, index: int, *, group: int = 0, lowres: bool | None = None) -> Camera:
    """Camera ``index`` of ``group`` in world ``seed`` (deterministic); ``lowres`` forces the sensor type."""
    rng = np.random.default_rng([seed, group, index, 0x5CE7E])
    kind = KINDS[int(rng.integers(len(KINDS)))]
    horizon = float(rng.uniform(0.12, 0.3))
    if lowres is None:
        lowres = bool(rng.random() < 0.2)
    # Cameras on a street tend to see people walking along it (profiles) or toward/away from them.
    view_p = rng.dirichlet((2.0, 2.0, 2.0))
    return Camera(
        seed=seed,
        group=group,
        index=index,
        kind=kind,
        horizon=horizon,
        base=float(horizon + rng.uniform(0.1, 0.2)),
        person_scale=float(rng.uniform(0.95, 1.25)),
        cast=tuple(float(c) for c in rng.uniform(0.88, 1.12, 3)),  # type: ignore[arg-type]
        gain=float(rng.uniform(0.85, 1.12)),
        light_dx=float(rng.uniform(-1.0, 1.0)),
        blur=float(rng.uniform(0.45, 1.3)),
        lowres=float(rng.uniform(0.45, 0.6)) if lowres else 1.0,
        noise=float(rng.uniform(1.5, 6.0)),
        jpeg_quality=int(rng.integers(72, 96)),
        view_p=tuple(float(v) for v in view_p),  # type: ignore[arg-type]
    )


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float = 18) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _facades(draw: ImageDraw.ImageDraw, rng: np.random.Generator, top: int, base: int, shops: bool) -> None:
    x = -int(rng.integers(0, 60))
    while x < SCENE_W:
        w = int(rng.integers(110, 260))
        wall = _jitter(rng, WALLS[int(rng.integers(len(WALLS)))])
        roof = top + int(rng.integers(0, max(1, (base - top) // 3)))
        draw.rectangle((x, roof, x + w, base), fill=wall)
        glass = _jitter(rng, (70, 86, 104), 14)
        frame = tuple(max(0, c - 40) for c in wall)
        cols = max(1, w // int(rng.integers(28, 44)))
        floor_h = int(rng.integers(26, 40))
        ww, wh = max(4, w // cols // 2), max(6, floor_h // 2)
        ground_floor = base - int(floor_h * 1.3)
        for row_y in range(roof + 8, ground_floor - wh, floor_h):
            for c in range(cols):
                wx = x + int((c + 0.5) * w / cols) - ww // 2
                draw.rectangle((wx - 1, row_y - 1, wx + ww + 1, row_y + wh + 1), fill=frame)
                draw.rectangle((wx, row_y, wx + ww, row_y + wh), fill=glass if rng.random() < 0.85 else (200, 190, 150))
        if shops or rng.random() < 0.4:
            sign = _jitter(rng, ((200, 40, 40), (30, 90, 170), (40, 140, 70), (230, 180, 30))[int(rng.integers(4))])
            draw.rectangle((x + 4, ground_floor - 10, x + w - 4, ground_floor - 2), fill=sign)
            pane = _jitter(rng, (150, 170, 180), 20)
            draw.rectangle((x + 8, ground_floor + 2, x + w - 8, base - 2), fill=pane)
            for k in range(1, 4):  # mullions and vague shapes behind the glass
                mx = x + 8 + k * (w - 16) // 4
                draw.line((mx, ground_floor + 2, mx, base - 2), fill=frame, width=2)
            door = x + int(rng.integers(12, max(13, w - 30)))
            draw.rectangle((door, ground_floor + 6, door + 16, base), fill=_jitter(rng, (60, 50, 45), 10))
        else:
            draw.rectangle((x, ground_floor, x + w, base), fill=tuple(max(0, c - 25) for c in wall))
        x += w


def _ground(draw: ImageDraw.ImageDraw, rng: np.random.Generator, kind: str, horizon: int, base: int) -> None:
    colour = {
        "street": (150, 148, 142), "shopfront": (170, 164, 154), "plaza": (186, 178, 164),
        "indoor": (196, 190, 178), "crossing": (88, 88, 92), "park": (92, 132, 70),
    }[kind]  # fmt: skip
    colour = _jitter(rng, colour, 10)
    draw.rectangle((0, base, SCENE_W, SCENE_H), fill=colour)
    line = tuple(max(0, c - 28) for c in colour)
    vx = SCENE_W * float(rng.uniform(0.3, 0.7))
    if kind == "park":
        path = _jitter(rng, (176, 160, 130), 8)
        a, b = float(rng.uniform(0.35, 0.55)), float(rng.uniform(0.1, 0.3))
        draw.polygon([(vx - 30, base), (vx + 30, base), (SCENE_W * (a + b) + 120, SCENE_H),
                      (SCENE_W * (a - b) - 120, SCENE_H)], fill=path)  # fmt: skip
        return
    n = int(rng.integers(7, 13))
    for k in range(1, n):  # tile rows, wider apart toward the camera
        y = base + (SCENE_H - base) * (k / n) ** 1.7
        draw.line((0, y, SCENE_W, y), fill=line, width=1 + int(k > n * 0.6))
    if kind in ("plaza", "indoor", "shopfront", "street"):
        for k in range(-14, 15):  # seams converging to the vanishing point
            xb = vx + k * SCENE_W / 9
            t = (base - horizon) / (SCENE_H - horizon)
            draw.line((vx + (xb - vx) * t, base, xb, SCENE_H), fill=line, width=1)
    if kind in ("street", "crossing"):
        kerb = base + int((SCENE_H - base) * 0.18)
        draw.rectangle((0, base, SCENE_W, kerb), fill=_jitter(rng, (168, 166, 160), 6))
        draw.line((0, kerb, SCENE_W, kerb), fill=(210, 208, 200), width=3)
    if kind == "crossing":
        for k in range(12):
            x0 = k * SCENE_W / 12 + 10
            draw.polygon([(x0, SCENE_H * 0.62), (x0 + 30, SCENE_H * 0.62), (x0 + 38, SCENE_H), (x0 - 2, SCENE_H)],
                         fill=(214, 212, 204))  # fmt: skip


def _props(draw: ImageDraw.ImageDraw, rng: np.random.Generator, kind: str, base: int) -> None:
    """Trees, poles, benches and parked cars standing on the ground line."""
    for _ in range(int(rng.integers(2, 7))):
        x = float(rng.uniform(0, SCENE_W))
        what = rng.choice(["tree", "pole", "bench", "car"] if kind != "indoor" else ["pole", "bench", "plant"])
        if what == "tree":
            h = float(rng.uniform(70, 140))
            draw.rectangle((x - 4, base - h * 0.5, x + 4, base + 6), fill=(82, 62, 44))
            green = _jitter(rng, (58, 104, 52), 16)
            for _ in range(5):
                dx, dy, r = rng.normal(0, 14), rng.normal(-h * 0.65, 12), rng.uniform(18, 30)
                draw.ellipse((x + dx - r, base + dy - r, x + dx + r, base + dy + r), fill=_jitter(rng, green, 10))
        elif what == "pole":
            draw.rectangle((x - 2, base - 110, x + 2, base + 8), fill=(70, 72, 74))
            draw.rectangle((x - 9, base - 116, x + 9, base - 106), fill=(90, 92, 96))
        elif what == "bench" or what == "plant":
            c = _jitter(rng, (110, 84, 60) if what == "bench" else (60, 110, 60), 12)
            draw.rectangle((x - 20, base - 14, x + 20, base + 4), fill=c)
        else:
            c = _jitter(rng, ((160, 30, 30), (200, 200, 200), (40, 40, 44), (40, 70, 140))[int(rng.integers(4))], 10)
            draw.rounded_rectangle((x - 50, base - 26, x + 50, base + 8), radius=8, fill=c)
            draw.rectangle((x - 30, base - 22, x + 26, base - 12), fill=(60, 70, 80))


@functools.lru_cache(maxsize=64)
def scene_image(camera: Camera) -> Image.Image:
    """The wide background scene of ``camera`` as it records it (RGB, SCENE_W x SCENE_H), built once per process."""
    rng = np.random.default_rng([camera.seed, camera.group, camera.index, 0xB6])
    img = Image.new("RGB", (SCENE_W, SCENE_H), (180, 190, 205))
    draw = ImageDraw.Draw(img)
    horizon, base = int(camera.horizon * SCENE_H), int(camera.base * SCENE_H)
    sky_top = _jitter(rng, (150, 176, 210), 14)
    for y in range(0, base, 4):  # sky gradient (mostly hidden behind facades)
        t = y / max(1, base)
        draw.rectangle((0, y, SCENE_W, y + 4), fill=tuple(int(c * (1 - 0.15 * t) + 40 * t) for c in sky_top))
    if camera.kind == "park":
        far = _jitter(rng, (70, 110, 64), 10)
        draw.rectangle((0, horizon, SCENE_W, base), fill=far)
        for _ in range(18):
            x, r = float(rng.uniform(0, SCENE_W)), float(rng.uniform(25, 60))
            draw.ellipse((x - r, base - 2.6 * r, x + r, base - 0.6 * r), fill=_jitter(rng, (52, 96, 50), 14))
            draw.rectangle((x - 3, base - 0.8 * r, x + 3, base), fill=(76, 58, 42))
    elif camera.kind == "indoor":
        wall = _jitter(rng, (214, 208, 196), 12)
        draw.rectangle((0, 0, SCENE_W, base), fill=wall)
        for _ in range(int(rng.integers(3, 7))):
            x = float(rng.uniform(0, SCENE_W))
            draw.rectangle((x, base - 70, x + 34, base), fill=_jitter(rng, (120, 96, 70), 16))
        for k in range(0, SCENE_W, 120):
            draw.ellipse((k + 30, 6, k + 90, 18), fill=(250, 248, 236))
    else:
        _facades(draw, rng, top=0 if camera.kind != "plaza" else horizon // 2, base=base,
                 shops=camera.kind == "shopfront")  # fmt: skip
    _ground(draw, rng, camera.kind, horizon, base)
    _props(draw, rng, camera.kind, base)
    arr = np.asarray(img, dtype=np.float32)
    # texture: low-frequency stains plus fine grain, so flat walls and floors are not flat colour
    low = rng.normal(0, 1, (SCENE_H // 24 + 1, SCENE_W // 24 + 1)).astype(np.float32)
    low_img = Image.fromarray(low).resize((SCENE_W, SCENE_H), Image.Resampling.BICUBIC)
    arr *= (1.0 + 0.07 * np.asarray(low_img))[..., None]
    arr += rng.normal(0, 5.0, arr.shape[:2]).astype(np.float32)[..., None]
    rows = np.linspace(0.0, 1.0, SCENE_H, dtype=np.float32)[:, None, None]
    arr *= 0.92 + 0.12 * rows  # ground near the camera is a little brighter
    arr *= np.asarray(camera.cast, np.float32) * camera.gain  # the camera's white balance and exposure
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def background_window(
    camera: Camera, *, height: int, width: int, scene_x: float, depth: float, person_px: float, feet_y: float,
    cx: float,
) -> Image.Image:  # fmt: skip
    """Background of a ``height`` x ``width`` crop whose person (``person_px`` tall, feet at crop row ``feet_y``,
    centre column ``cx``) stands at ``scene_x`` (0..1 across) and ``depth`` (0 far .. 1 near) in the scene."""
    scene = scene_image(camera)
    horizon, base = camera.horizon * SCENE_H, camera.base * SCENE_H
    y_feet = base + 0.1 * (SCENE_H - base) + depth * 0.85 * (SCENE_H - base)
    person_scene = camera.person_scale * (y_feet - horizon)
    s = person_scene / max(person_px, 1.0)  # scene pixels per crop pixel
    s = min(s, SCENE_H / height, SCENE_W / width)
    x0 = scene_x * SCENE_W - cx * s
    y0 = y_feet - feet_y * s
    # When s is capped at SCENE_H / height, SCENE_H - height * s can round to -5.7e-14 (height 169, 338, ...):
    # clamp the bounds at 0 and the box at the scene's edge so PIL never sees a negative offset or an overrun.
    x0 = float(np.clip(x0, 0, max(SCENE_W - width * s, 0.0)))
    y0 = float(np.clip(y0, 0, max(SCENE_H - height * s, 0.0)))
    box = (x0, y0, min(x0 + width * s, SCENE_W), min(y0 + height * s, SCENE_H))
    window = scene.resize((width, height), Image.Resampling.BILINEAR, box=box)
    return window
