"""Heads: cranium (hair or scalp), face, ears, eyes, long hair and ponytails, glasses and hats."""

from __future__ import annotations

from pipeline.synth.canvas import Point
from pipeline.synth.pen import FACE_DETAIL, GLASSES, HAIR, HAT, SCALP, SKIN_FACE, Pen


def draw_long_hair(pen: Pen) -> None:
    look, p, sk = pen.look, pen.p, pen.sk
    if look.hair_style != "long":
        return
    hh = p.head_h
    hx, hy = pen.pt("head")
    length = p.shoulder_y + (0.09 if look.female else 0.04)
    if sk.view == "side":
        f = pen.f
        pts = [pen.at(-f * 0.02, hh * 0.3), pen.at(-f * 0.36 * hh - f * 0.01, hh * 0.4),
               pen.at(-f * 0.075, length), pen.at(-f * 0.02, length - 0.02)]  # fmt: skip
        pts = [(x + hx - pen.cx, y) for x, y in pts]
        pen.polygon(pts, HAIR, "hair")
        return
    w_top, w_bottom = 0.5 * hh, 0.6 * hh if sk.view == "back" else 0.62 * hh
    pts = [(hx - w_top * pen.u, hy), (hx + w_top * pen.u, hy), (hx + w_bottom * pen.u, pen.at(0, length)[1]),
           (hx - w_bottom * pen.u, pen.at(0, length)[1])]  # fmt: skip
    pen.polygon(pts, HAIR, "hair")


def draw_head(pen: Pen) -> None:
    look, p, sk, u = pen.look, pen.p, pen.sk, pen.u
    hh = p.head_h
    hx, hy = pen.pt("head")
    has_hair = look.hair_style != "bald"
    # the cranium: hair, or bare scalp (part class "head" either way; the face is only the front)
    cranium, cranium_tag = (HAIR, "hair") if has_hair else (SCALP, "scalp")
    face_rx, face_ry = 0.34 * hh, 0.44 * hh
    if sk.view == "side":
        f = pen.f
        pen.ellipse((hx - f * 0.06 * hh * u, hy - 0.05 * hh * u), 0.41 * hh, 0.48 * hh, cranium, cranium_tag)
        face_c = (hx + f * 0.07 * hh * u, hy + 0.05 * hh * u)
        pen.ellipse(face_c, face_rx * 0.95, face_ry, SKIN_FACE, "face")
        pen.ellipse(pen.pt("nose"), 0.07 * hh, 0.09 * hh, SKIN_FACE, "face")
        ear = pen.pt(f"{sk.near_side()}_ear")
        if look.hair_style != "long":
            pen.ellipse(ear, 0.08 * hh, 0.13 * hh, SKIN_FACE, f"{sk.near_side()}_ear")
        if has_hair:  # hair over the top, above the face
            pen.ellipse((hx - f * 0.03 * hh * u, hy - 0.3 * hh * u), 0.36 * hh, 0.2 * hh, HAIR, "hair")
        if look.hair_style == "ponytail":
            pen.capsule((hx - f * 0.4 * hh * u, hy - 0.05 * hh * u), (hx - f * 0.55 * hh * u, hy + 0.5 * hh * u),
                        0.1 * hh, 0.07 * hh, HAIR, "hair")  # fmt: skip
        _eye(pen, pen.pt(f"{sk.near_side()}_eye"))
        if look.glasses:
            eye = pen.pt(f"{sk.near_side()}_eye")
            pen.line([(eye[0] + f * 0.05 * hh * u, eye[1]), (ear[0], ear[1] - 0.05 * hh * u)], 0.05 * hh, GLASSES,
                     "face")  # fmt: skip
            pen.cv.ellipse(eye, 0.1 * hh * u, 0.08 * hh * u, pen.m(GLASSES), pen.t("face"), shade=False)
        _hat(pen, hx, hy, hh)
        return
    pen.ellipse((hx, hy - 0.06 * hh * u), 0.42 * hh, 0.5 * hh, cranium, cranium_tag)
    for side in ("left", "right"):
        ex, ey = pen.pt(f"{side}_ear")
        if look.hair_style != "long":
            pen.ellipse((ex, ey), 0.08 * hh, 0.13 * hh, SKIN_FACE, f"{side}_ear")
    if sk.view == "back":  # the back of the head, narrower than the ears
        pen.ellipse((hx, hy - 0.02 * hh * u), 0.34 * hh, 0.47 * hh, cranium, cranium_tag)
        if look.hair_style == "ponytail":
            pen.capsule((hx, hy + 0.1 * hh * u), (hx, hy + 0.75 * hh * u), 0.1 * hh, 0.07 * hh, HAIR, "hair")
        _hat(pen, hx, hy, hh)
        return
    face_c = (hx, hy + 0.06 * hh * u)
    pen.ellipse(face_c, face_rx, face_ry, SKIN_FACE, "face")
    if has_hair:  # fringe
        pts = [(hx - 0.36 * hh * u, hy - 0.05 * hh * u), (hx - 0.3 * hh * u, hy - 0.36 * hh * u),
               (hx + 0.3 * hh * u, hy - 0.36 * hh * u), (hx + 0.36 * hh * u, hy - 0.05 * hh * u),
               (hx + 0.2 * hh * u, hy - 0.2 * hh * u), (hx - 0.25 * hh * u, hy - 0.18 * hh * u)]  # fmt: skip
        pen.polygon(pts, HAIR, "hair")
    if look.hair_style == "long":  # strands over the shoulders
        for sign in (-1.0, 1.0):
            a = (hx + sign * 0.36 * hh * u, hy - 0.05 * hh * u)
            b = (hx + sign * 0.5 * hh * u, pen.at(0, p.shoulder_y + (0.06 if look.female else 0.0))[1])
            pen.capsule(a, b, 0.09 * hh, 0.12 * hh, HAIR, "hair")
    for side in ("left", "right"):
        _eye(pen, pen.pt(f"{side}_eye"))
    mx, my = hx, hy + 0.3 * hh * u
    pen.line([(mx - 0.1 * hh * u, my), (mx + 0.1 * hh * u, my)], 0.025 * hh, FACE_DETAIL, "face")
    if look.glasses:
        le, re = pen.pt("left_eye"), pen.pt("right_eye")
        pen.line([le, re], 0.05 * hh, GLASSES, "face")
        for e in (le, re):
            pen.cv.ellipse(e, 0.12 * hh * u, 0.09 * hh * u, pen.m(GLASSES), pen.t("face"), shade=False)
    _hat(pen, hx, hy, hh)


def _eye(pen: Pen, eye: Point) -> None:
    r = max(0.5, 0.045 * pen.p.head_h * pen.u)
    pen.cv.ellipse(eye, r, r * 0.8, pen.m(FACE_DETAIL), pen.t("face"), shade=False)


def _hat(pen: Pen, hx: float, hy: float, hh: float) -> None:
    look, u = pen.look, pen.u
    if look.hat is None:
        return
    f = pen.f
    if look.hat == "sunhat":
        pen.ellipse((hx, hy - 0.28 * hh * u), 0.78 * hh, 0.13 * hh, HAT, "hat")
        pen.ellipse((hx, hy - 0.38 * hh * u), 0.38 * hh, 0.26 * hh, HAT, "hat")
        return
    dome = [(hx + 0.44 * hh * u * c, hy - 0.22 * hh * u - 0.36 * hh * u * s)
            for c, s in ((1, 0), (0.8, 0.6), (0.4, 0.92), (0, 1), (-0.4, 0.92), (-0.8, 0.6), (-1, 0))]  # fmt: skip
    if look.hat == "beanie":
        dome = [(x, y + 0.06 * hh * u) for x, y in dome]
        dome[0] = (dome[0][0], hy - 0.1 * hh * u)
        dome[-1] = (dome[-1][0], hy - 0.1 * hh * u)
    pen.polygon(dome, HAT, "hat")
    if look.hat == "cap":
        if pen.sk.view == "side":
            k = hh * u
            brim = [(hx, hy - 0.26 * k), (hx + f * 0.75 * k, hy - 0.2 * k), (hx + f * 0.7 * k, hy - 0.14 * k),
                    (hx, hy - 0.18 * k)]  # fmt: skip
            pen.polygon(brim, HAT, "hat")
        elif pen.sk.view == "front":
            pen.ellipse((hx, hy - 0.2 * hh * u), 0.46 * hh, 0.07 * hh, HAT, "hat", tone=0.85)
