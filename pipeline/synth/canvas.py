"""Painter's-algorithm canvas: every shape gets an index, a material and a body-segment tag.

Shapes are drawn back to front with PIL into a shape-index image (one byte per pixel, so at most 255
shapes), which makes the part mask exactly the pixels each part was drawn on: ``material -> part class``
is a table lookup. A second image receives a rounded shading profile per shape (a dark base and two
smaller, lighter copies shifted toward the light), blurred later into smooth cylinder-like shading.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

Point = tuple[float, float]
SHADE_LEVELS = ((1.0, 0.0, 150), (0.72, 0.22, 204), (0.42, 0.36, 245))  # (size factor, light shift, value)
_HALF_CIRCLE = tuple((math.cos(t), math.sin(t)) for t in np.linspace(0.0, math.pi, 7))
SHADE_SCALE = 0.5  # shading is smooth, so it is drawn at half resolution and interpolated up


class CanvasFull(RuntimeError):
    """More than 255 shapes in one crop (never happens for one or two people)."""


class Canvas:
    """Shape-index + shading images of one crop, plus per-shape material and tag tables."""

    def __init__(self, height: int, width: int, light_dx: float = -0.6) -> None:
        self.height, self.width = height, width
        self.light_dx = light_dx
        self.sid = Image.new("L", (width, height), 0)
        self.shade = Image.new("L", (max(1, round(width * SHADE_SCALE)), max(1, round(height * SHADE_SCALE))), 0)
        self._ds = ImageDraw.Draw(self.sid)
        self._dh = ImageDraw.Draw(self.shade)
        self.materials: list[int] = [0]
        self.tags: list[str] = [""]

    def _new(self, material: int, tag: str) -> int:
        index = len(self.materials)
        if index > 255:
            raise CanvasFull("more than 255 shapes in one crop")
        self.materials.append(material)
        self.tags.append(tag)
        return index

    def polygon(self, pts: list[Point], material: int, tag: str, *, tone: float = 1.0, shade: bool = True) -> None:
        """Filled polygon; shading treats it as a vertical cylinder (light from the side)."""
        if len(pts) < 3:
            return
        index = self._new(material, tag)
        self._ds.polygon(pts, fill=index)
        if not shade:
            return
        cx = sum(p[0] for p in pts) / len(pts)
        cy = sum(p[1] for p in pts) / len(pts)
        half_w = (max(p[0] for p in pts) - min(p[0] for p in pts)) / 2
        for factor, shift, value in SHADE_LEVELS:
            dx = self.light_dx * shift * half_w
            sy = 1.0 - (1.0 - factor) * 0.25
            k = SHADE_SCALE
            shrunk = [((cx + (x - cx) * factor + dx) * k, (cy + (y - cy) * sy) * k) for x, y in pts]
            self._dh.polygon(shrunk, fill=int(value * tone))

    def capsule(
        self, p0: Point, p1: Point, r0: float, r1: float, material: int, tag: str, *, tone: float = 1.0,
        shade: bool = True,
    ) -> None:  # fmt: skip
        """A limb: a tapered segment with round ends, radius ``r0`` at ``p0`` and ``r1`` at ``p1``."""
        index = self._new(material, tag)
        self._capsule(self._ds, p0, p1, r0, r1, index)
        if not shade:
            return
        dx, dy = p1[0] - p0[0], p1[1] - p0[1]
        n = math.hypot(dx, dy) or 1.0
        nx, ny = -dy / n, dx / n  # unit normal; shift toward the light along it
        side = 1.0 if nx * self.light_dx >= 0 else -1.0
        k = SHADE_SCALE
        for factor, shift, value in SHADE_LEVELS:
            ox, oy = nx * side * shift * r0 * abs(self.light_dx), ny * side * shift * r0 * abs(self.light_dx)
            self._capsule(
                self._dh, ((p0[0] + ox) * k, (p0[1] + oy) * k), ((p1[0] + ox) * k, (p1[1] + oy) * k),
                r0 * factor * k, r1 * factor * k, int(value * tone),
            )  # fmt: skip

    @staticmethod
    def _capsule(draw: ImageDraw.ImageDraw, p0: Point, p1: Point, r0: float, r1: float, fill: int) -> None:
        """One polygon: the two half circles at the ends joined by the tapered sides (one draw call)."""
        x0, y0 = p0
        x1, y1 = p1
        dx, dy = x1 - x0, y1 - y0
        n = math.hypot(dx, dy)
        ux, uy = (dx / n, dy / n) if n > 1e-6 else (0.0, 1.0)
        # from +normal through the outward direction to -normal, around p1 then around p0
        pts = [(x1 + r1 * (c * -uy + s * ux), y1 + r1 * (c * ux + s * uy)) for c, s in _HALF_CIRCLE]
        pts += [(x0 + r0 * (c * uy - s * ux), y0 + r0 * (-c * ux - s * uy)) for c, s in _HALF_CIRCLE]
        draw.polygon(pts, fill=fill)

    def ellipse(
        self, center: Point, rx: float, ry: float, material: int, tag: str, *, tone: float = 1.0, shade: bool = True
    ) -> None:
        """Filled ellipse shaded as a sphere."""
        index = self._new(material, tag)
        x, y = center
        self._ds.ellipse((x - rx, y - ry, x + rx, y + ry), fill=index)
        if not shade:
            return
        k = SHADE_SCALE
        for factor, shift, value in SHADE_LEVELS:
            ox = self.light_dx * shift * rx
            oy = -abs(shift) * ry * 0.4
            box = (x + ox - rx * factor, y + oy - ry * factor, x + ox + rx * factor, y + oy + ry * factor)
            self._dh.ellipse(tuple(v * k for v in box), fill=int(value * tone))

    def line(self, pts: list[Point], width: float, material: int, tag: str) -> None:
        """A flat stroke (straps, stripes, railings): keeps the shading of what lies under it."""
        index = self._new(material, tag)
        self._ds.line(pts, fill=index, width=max(1, int(round(width))))

    def rectangle(self, box: tuple[float, float, float, float], material: int, tag: str, *, shade: bool = True) -> None:
        x0, y0, x1, y1 = box
        self.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], material, tag, shade=shade)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shape index HxW uint8, material per shape index, tag per shape index)."""
        return np.asarray(self.sid), np.asarray(self.materials, dtype=np.uint8), np.asarray(self.tags, dtype=object)
