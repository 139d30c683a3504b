"""Materials, part classes and the ``Pen`` that draws one person's shapes onto a ``Canvas``.

Materials decide colour and part class (``PART_OF_MATERIAL``, ids of ``data_manifests/parts.yaml``);
tags name the body segment a shape belongs to, which is how keypoint visibility is decided (a joint
is visible when the topmost shape at its pixel belongs to its own segment).
"""

from __future__ import annotations

import numpy as np

from pipeline.synth.canvas import Canvas, Point
from pipeline.synth.look import Look
from pipeline.synth.pose import Skeleton

# Materials (colour + part class). A second person (drawn as background clutter) uses ids + OTHER.
SKIN_FACE, SKIN_ARM, SKIN_LEG, HAIR, HAT, TOP, TOP2, COAT, LOWER, LOWER2 = range(1, 11)
SHOE, SOLE, BAG, BAG2, STRAP, GLASSES, FACE_DETAIL, LOGO, OBJECT, SHADOW = range(11, 21)
OCC_A, OCC_B, OCC_C, SCALP = 21, 22, 23, 24
OTHER = 25
NUM_MATERIALS = 2 * OTHER
# part classes (data_manifests/parts.yaml order)
BACKGROUND, HEAD, FACE, UPPER, ARMS, LOWER_CLOTHES, LEGS, SHOES, ACCESSORIES = range(9)
PART_OF_MATERIAL = np.zeros(NUM_MATERIALS, dtype=np.uint8)
for _mats, _part in (
    ((SKIN_FACE, GLASSES, FACE_DETAIL), FACE),
    ((HAIR, HAT, SCALP), HEAD),
    ((TOP, TOP2, COAT, LOGO), UPPER),
    ((SKIN_ARM,), ARMS),
    ((LOWER, LOWER2), LOWER_CLOTHES),
    ((SKIN_LEG,), LEGS),
    ((SHOE, SOLE), SHOES),
    ((BAG, BAG2, STRAP, OBJECT), ACCESSORIES),
):
    PART_OF_MATERIAL[list(_mats)] = _part

PART_OF_MATERIAL_256 = np.zeros(256, dtype=np.uint8)  # the same table padded for byte lookups
PART_OF_MATERIAL_256[:NUM_MATERIALS] = PART_OF_MATERIAL

FAR_TONE = 0.8  # limbs on the far side of a profile are in the body's shadow


class Pen:
    """Draws one person: joint lookup in pixels, units, materials, tags (overridable for clutter people)."""

    def __init__(self, cv: Canvas, look: Look, sk: Skeleton, offset: int, tag: str | None) -> None:
        self.cv, self.look, self.sk, self.offset, self.tag_override = cv, look, sk, offset, tag
        self.u = sk.unit
        self.p = sk.prop
        hips = (sk["left_hip"] + sk["right_hip"]) / 2
        self.cx, self.top = float(hips[0]), float(sk["head"][1] - sk.prop.head_h * sk.unit / 2)
        self.f = sk.facing

    def pt(self, name: str, dx: float = 0.0, dy: float = 0.0) -> Point:
        x, y = self.sk[name]
        return (float(x) + dx * self.u, float(y) + dy * self.u)

    def at(self, x: float, y: float) -> Point:
        """Body units (x from the centre line, y from the top of the head) to pixels."""
        return (self.cx + x * self.u, self.top + y * self.u)

    def m(self, material: int) -> int:
        return material + self.offset

    def t(self, tag: str) -> str:
        return self.tag_override or tag

    def capsule(self, a: Point, b: Point, r0: float, r1: float, material: int, tag: str, tone: float = 1.0) -> None:
        self.cv.capsule(a, b, r0 * self.u, r1 * self.u, self.m(material), self.t(tag), tone=tone)

    def ellipse(self, c: Point, rx: float, ry: float, material: int, tag: str, tone: float = 1.0) -> None:
        self.cv.ellipse(c, rx * self.u, ry * self.u, self.m(material), self.t(tag), tone=tone)

    def polygon(self, pts: list[Point], material: int, tag: str, tone: float = 1.0, shade: bool = True) -> None:
        self.cv.polygon(pts, self.m(material), self.t(tag), tone=tone, shade=shade)

    def line(self, pts: list[Point], width: float, material: int, tag: str) -> None:
        self.cv.line(pts, width * self.u, self.m(material), self.t(tag))


def lerp(a: Point, b: Point, t: float) -> Point:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)
