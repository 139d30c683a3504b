"""Drawing one person onto a ``Canvas``: filled, shaded body parts and garments in painter's order.

Torso, limbs, lower garments, shoes and bags are drawn here, the head in ``head.py``; materials, part
classes and the ``Pen`` live in ``pen.py``.
"""

from __future__ import annotations

import numpy as np

from pipeline.synth.canvas import Canvas, Point
from pipeline.synth.head import draw_head, draw_long_hair
from pipeline.synth.look import Look
from pipeline.synth.pen import (
    BAG,
    BAG2,
    COAT,
    FAR_TONE,
    LOGO,
    LOWER,
    LOWER2,
    OBJECT,
    SHADOW,
    SHOE,
    SKIN_ARM,
    SKIN_FACE,
    SKIN_LEG,
    SOLE,
    STRAP,
    TOP,
    TOP2,
    Pen,
    lerp,
)
from pipeline.synth.pose import Skeleton


def _top_material(look: Look) -> int:
    return COAT if look.long_coat else TOP


def _hem_y(look: Look, pen: Pen) -> float:
    p = pen.p
    if look.long_coat:
        return p.knee_y + 0.03
    return p.hip_y + {"tshirt": 0.035, "shirt": 0.05, "sweater": 0.04, "jacket": 0.06}[look.top_type]


def _torso_profile(look: Look, pen: Pen) -> list[tuple[float, float]]:
    """(y, half-width) of the upper garment in a front/back view, top to bottom."""
    p, add = pen.p, {"jacket": 0.012, "sweater": 0.006, "coat": 0.014}.get(look.top_type, 0.0)
    waist = p.hip_w * 1.04 + (0.008 if not look.female else -0.006) + (look.build - 1.0) * 0.05
    prof = [
        (p.shoulder_y - 0.02, 0.036),
        (p.shoulder_y - 0.004, p.shoulder_w - p.arm_r * 0.3 + add),
        (p.shoulder_y + 0.04, p.shoulder_w + add),
        (p.shoulder_y + 0.11, p.shoulder_w * 0.9 + add),
        (p.hip_y - 0.08, waist + add),
    ]
    hem = _hem_y(look, pen)
    prof.append((hem, p.hip_w * (1.5 if look.long_coat else 1.12) + add))
    return prof


def _side_profile(look: Look, pen: Pen) -> list[tuple[float, float, float]]:
    """(y, back offset, front offset) of the upper garment in a profile, body units toward ``facing``."""
    p, b = pen.p, look.build
    chest = 0.064 + (0.012 if look.female and look.age != "child" else 0.0)
    hem = _hem_y(look, pen)
    flare = 0.03 if look.long_coat else 0.0
    return [
        (p.shoulder_y - 0.02, -0.028, 0.026),
        (p.shoulder_y + 0.01, -0.06 * b, 0.05 * b),
        (p.shoulder_y + 0.09, -0.058 * b, chest * b),
        (p.hip_y - 0.08, -0.05 * b, (0.046 + 0.03 * (b - 1.0)) * b),
        (hem, -0.058 * b - flare, 0.056 * b + flare),
    ]


def _interp(prof: list, y: float, col: int) -> float:
    ys = [r[0] for r in prof]
    return float(np.interp(y, ys, [r[col] for r in prof]))


def _torso_outline(look: Look, pen: Pen, y0: float, y1: float) -> list[Point]:
    """Polygon of the upper garment between body heights ``y0`` and ``y1`` (a vertical band)."""
    sk = pen.sk
    neck_x = (float(sk["neck"][0]) - pen.cx) / pen.u
    ys = [y for y, *_ in (_side_profile(look, pen) if sk.view == "side" else _torso_profile(look, pen))]
    ys = [y0] + [y for y in ys if y0 < y < y1] + [y1]
    top_y, bottom_y = ys[0], ys[-1]

    def centre(y: float) -> float:  # the centre line leans from the hips up to the neck
        t = (pen.p.hip_y - y) / (pen.p.hip_y - top_y) if pen.p.hip_y != top_y else 0.0
        return neck_x * max(0.0, min(1.0, t)) * (1.0 if bottom_y > top_y else 0.0)

    if sk.view == "side":
        prof = _side_profile(look, pen)
        back = [pen.at(centre(y) + pen.f * _interp(prof, y, 1), y) for y in ys]
        front = [pen.at(centre(y) + pen.f * _interp(prof, y, 2), y) for y in reversed(ys)]
        return back + front
    prof = _torso_profile(look, pen)
    left = [pen.at(centre(y) - _interp(prof, y, 1), y) for y in ys]
    right = [pen.at(centre(y) + _interp(prof, y, 1), y) for y in reversed(ys)]
    return left + right


def draw_person(cv: Canvas, look: Look, sk: Skeleton, *, offset: int = 0, tag: str | None = None) -> None:
    """Draw ``look`` posed as ``sk``. ``offset``/``tag`` re-map materials/tags for a clutter person."""
    pen = Pen(cv, look, sk, offset, tag)
    _shadow(pen)
    if sk.view == "side":
        near = sk.near_side()
        far = "left" if near == "right" else "right"
        _arm(pen, far, FAR_TONE)
        _leg(pen, far, FAR_TONE)
        _pelvis(pen)
        _leg(pen, near, 1.0)
        _skirt(pen)
        _neck(pen)
        _torso(pen)
        _bags_behind(pen)
        draw_long_hair(pen)
        _held_object(pen)
        _arm(pen, near, 1.0)
        _bags_front(pen)
        draw_head(pen)
        return
    if sk.view == "front":
        draw_long_hair(pen)
    for side in ("left", "right"):
        _leg(pen, side, 1.0)
    _pelvis(pen)
    _skirt(pen)
    _neck(pen)
    _torso(pen)
    if sk.view == "back":
        _bags_behind(pen)
        draw_long_hair(pen)
    _bags_front(pen)  # straps and a shoulder bag lie on the body, under the arms
    _held_object(pen)
    for side in ("left", "right"):
        _arm(pen, side, 1.0)
    draw_head(pen)


def _shadow(pen: Pen) -> None:
    ankles = [pen.sk["left_ankle"], pen.sk["right_ankle"]]
    x = float(sum(a[0] for a in ankles) / 2)
    y = float(max(a[1] for a in ankles)) + 0.03 * pen.u
    pen.cv.ellipse((x + 0.03 * pen.u, y), 0.17 * pen.u, 0.026 * pen.u, pen.m(SHADOW), pen.t("shadow"), shade=False)


def _leg(pen: Pen, side: str, tone: float) -> None:
    look, p = pen.look, pen.p
    hip, knee, ankle = pen.pt(f"{side}_hip"), pen.pt(f"{side}_knee"), pen.pt(f"{side}_ankle")
    thigh, shin, foot = f"{side}_thigh", f"{side}_shin", f"{side}_foot"
    if look.lower_type == "trousers":
        pen.capsule(hip, knee, p.thigh_r * 1.08, p.thigh_r * 0.8, LOWER, thigh, tone)
        pen.capsule(knee, ankle, p.shin_r * 1.22, p.shin_r * 1.1, LOWER, shin, tone)
    else:
        pen.capsule(hip, knee, p.thigh_r, p.thigh_r * 0.7, SKIN_LEG, thigh, tone)
        pen.capsule(knee, ankle, p.shin_r, p.shin_r * 0.62, SKIN_LEG, shin, tone)
        if look.lower_type == "shorts":
            pen.capsule(hip, lerp(hip, knee, 0.62), p.thigh_r * 1.12, p.thigh_r * 1.02, LOWER, thigh, tone)
    if look.lower_pattern == "stripe" and look.lower_type != "skirt":
        end = ankle if look.lower_type == "trousers" else lerp(hip, knee, 0.6)
        if pen.sk.view == "side":
            dx = 0.0
        else:
            dx = (1.0 if hip[0] > pen.cx else -1.0) * p.thigh_r * 0.72 * pen.u
        pen.line([(hip[0] + dx, hip[1]), (end[0] + dx * 0.9, end[1])], 0.012, LOWER2, thigh)
    _shoe(pen, side, ankle, tone, foot)


def _shoe(pen: Pen, side: str, ankle: Point, tone: float, tag: str) -> None:
    look, p, u = pen.look, pen.p, pen.u
    if look.shoe_type == "boots":
        knee = pen.pt(f"{side}_knee")
        pen.capsule(lerp(knee, ankle, 0.5), ankle, p.shin_r * 1.22, p.shin_r * 1.15, SHOE, tag, tone)
    x, y = ankle
    if pen.sk.view == "side":
        f = pen.f
        heel, toe = x - f * 0.032 * u, x + f * 0.088 * u
        pts = [(heel, y - 0.018 * u), (x + f * 0.02 * u, y - 0.014 * u), (toe, y + 0.016 * u),
               (toe, y + 0.036 * u), (heel, y + 0.036 * u)]  # fmt: skip
        pen.polygon(pts, SHOE, tag, tone)
        pen.line([(heel, y + 0.036 * u), (toe, y + 0.036 * u)], 0.009, SOLE, tag)
    else:
        rx = p.shin_r * 1.35
        pen.ellipse((x, y + 0.018 * u), rx, 0.026, SHOE, tag, tone)
        pen.line([(x - rx * u * 0.9, y + 0.04 * u), (x + rx * u * 0.9, y + 0.04 * u)], 0.008, SOLE, tag)


def _pelvis(pen: Pen) -> None:
    look, p = pen.look, pen.p
    if look.lower_type == "skirt":
        return
    top, bottom = p.hip_y - 0.06, p.hip_y + 0.07
    if pen.sk.view == "side":
        f = pen.f
        pts = [pen.at(-f * 0.06, top), pen.at(f * 0.05, top), pen.at(f * 0.055, bottom), pen.at(-f * 0.065, bottom)]
    else:
        w = p.hip_w + p.thigh_r * 0.55
        pts = [pen.at(-w * 0.98, top), pen.at(w * 0.98, top), pen.at(w, p.hip_y + 0.03), pen.at(0.0, bottom),
               pen.at(-w, p.hip_y + 0.03)]  # fmt: skip
    pen.polygon(pts, LOWER, "pelvis")


def _skirt(pen: Pen) -> None:
    look, p = pen.look, pen.p
    if look.lower_type != "skirt":
        return
    top = p.hip_y - 0.07
    bottom = p.knee_y + (0.06 if look.age == "elderly" else -0.01)
    sway = 0.012 * np.sin(float(np.arctan2(*(pen.sk["left_knee"] - pen.sk["right_knee"]))))
    if pen.sk.view == "side":
        f = pen.f
        pts = [pen.at(-f * 0.055, top), pen.at(f * 0.05, top), pen.at(f * 0.11 + sway, bottom),
               pen.at(-f * 0.1 + sway, bottom)]  # fmt: skip
    else:
        w = p.hip_w + 0.03
        pts = [pen.at(-w * 0.95, top), pen.at(w * 0.95, top), pen.at(w * 1.55 + sway, bottom),
               pen.at(-w * 1.55 + sway, bottom)]  # fmt: skip
    pen.polygon(pts, LOWER, "skirt")


def _neck(pen: Pen) -> None:
    pen.capsule(pen.pt("neck", 0, -0.03), pen.pt("neck", 0, 0.035), 0.026, 0.029, SKIN_FACE, "neck")


def _torso(pen: Pen) -> None:
    look, p, sk = pen.look, pen.p, pen.sk
    mat = _top_material(look)
    top, hem = p.shoulder_y - 0.02, _hem_y(look, pen)
    pen.polygon(_torso_outline(look, pen, top, hem), mat, "torso")
    if look.top_pattern == "splice":
        split = p.shoulder_y + 0.13
        pen.polygon(_torso_outline(look, pen, split, hem), TOP2, "torso")
    if sk.view == "front" and not look.long_coat:  # neckline: a little skin below the collar
        nx, ny = pen.pt("neck")
        r = 0.022 * pen.u
        v_depth = 0.05 if look.top_type == "shirt" else 0.03
        pts = [(nx - r, ny + 0.01 * pen.u), (nx + r, ny + 0.01 * pen.u), (nx, ny + v_depth * pen.u)]
        pen.polygon(pts, SKIN_FACE, "neck", shade=False)
    if look.top_type == "jacket" and sk.view == "front":  # open jacket: zip line
        pen.line([pen.at(0, p.shoulder_y + 0.02), pen.at(0, hem - 0.005)], 0.007, TOP2, "torso")
    if look.long_coat and sk.view == "front":
        pen.line([pen.at(0.0, p.shoulder_y + 0.03), pen.at(0.012, hem - 0.005)], 0.006, LOGO, "torso")
    if look.top_pattern == "logo" and sk.view != "side":
        cx, cy = pen.at(0.0, p.shoulder_y + 0.095)
        r = 0.036 * pen.u
        kind = sum(map(ord, look.top_color + look.top_color2)) % 3  # stable across processes
        if kind == 0:
            pen.cv.ellipse((cx, cy), r, r, pen.m(LOGO), pen.t("torso"), shade=False)
        elif kind == 1:
            pen.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], LOGO, "torso", shade=False)
        else:
            pen.polygon([(cx - r * 1.3, cy - r * 0.5), (cx + r * 1.3, cy - r * 0.5), (cx + r * 1.3, cy + r * 0.5),
                         (cx - r * 1.3, cy + r * 0.5)], LOGO, "torso", shade=False)  # fmt: skip
    elif look.top_pattern == "logo":
        cx, cy = pen.at(pen.f * 0.035, p.shoulder_y + 0.08)
        r = 0.02 * pen.u
        pen.cv.ellipse((cx, cy), r, r, pen.m(LOGO), pen.t("torso"), shade=False)


def _arm(pen: Pen, side: str, tone: float) -> None:
    look, p = pen.look, pen.p
    sh, el, wr = pen.pt(f"{side}_shoulder"), pen.pt(f"{side}_elbow"), pen.pt(f"{side}_wrist")
    sleeve = TOP2 if look.top_pattern == "splice" else _top_material(look)
    thick = {"jacket": 1.3, "coat": 1.32, "sweater": 1.18}.get(look.top_type, 1.12)
    uarm, farm, hand = f"{side}_uarm", f"{side}_farm", f"{side}_hand"
    # the arm hangs from just below the shoulder joint, so its round top does not poke above the shoulder line
    sh = (sh[0], sh[1] + 0.016 * pen.u) if pen.sk.view != "side" else sh
    if look.sleeve == "long":
        pen.capsule(sh, el, p.arm_r * thick * 0.95, p.arm_r * 0.9 * thick, sleeve, uarm, tone)
        pen.capsule(el, wr, p.arm_r * 0.9 * thick, p.arm_r * 0.78 * thick, sleeve, farm, tone)
    else:
        pen.capsule(sh, el, p.arm_r, p.arm_r * 0.82, SKIN_ARM, uarm, tone)
        pen.capsule(el, wr, p.arm_r * 0.82, p.arm_r * 0.66, SKIN_ARM, farm, tone)
        pen.capsule(sh, lerp(sh, el, 0.55), p.arm_r * thick, p.arm_r * thick, sleeve, uarm, tone)
    d = np.subtract(wr, el)
    d = d / (np.hypot(*d) or 1.0)
    hand_c = (wr[0] + d[0] * 0.028 * pen.u, wr[1] + d[1] * 0.028 * pen.u)
    pen.ellipse(hand_c, 0.022, 0.03, SKIN_ARM, hand, tone)
    if look.handbag and side == "right":
        _handbag(pen, hand_c, tone)


def _handbag(pen: Pen, hand: Point, tone: float) -> None:
    u = pen.u
    x, y = hand
    top, h, w = y + 0.035 * u, 0.085 * u, 0.05 * u
    pen.line([(x, y), (x - w * 0.6, top), (x + w * 0.6, top), (x, y)], 0.006, STRAP, "bag")
    pts = [(x - w * 0.85, top), (x + w * 0.85, top), (x + w, top + h), (x - w, top + h)]
    pen.polygon(pts, BAG, "bag", tone)


def _bags_behind(pen: Pen) -> None:
    """A backpack's body (seen from behind or in profile)."""
    look, p, sk = pen.look, pen.p, pen.sk
    if not look.backpack:
        return
    top, bottom = p.shoulder_y + 0.015, p.hip_y - 0.05
    if sk.view == "back":
        w = p.shoulder_w * 0.78
        pen.polygon([pen.at(-w, top), pen.at(w, top), pen.at(w * 1.04, bottom), pen.at(-w * 1.04, bottom)], BAG, "bag")
        pen.polygon([pen.at(-w * 0.6, bottom - 0.09), pen.at(w * 0.6, bottom - 0.09), pen.at(w * 0.62, bottom - 0.01),
                     pen.at(-w * 0.62, bottom - 0.01)], BAG2, "bag")  # fmt: skip
    elif sk.view == "side":
        f, back = pen.f, -0.058 * look.build
        pts = [pen.at(f * (back + 0.01), top), pen.at(f * (back - 0.075), top + 0.02),
               pen.at(f * (back - 0.08), bottom), pen.at(f * (back + 0.012), bottom)]  # fmt: skip
        pen.polygon(pts, BAG, "bag")


def _bags_front(pen: Pen) -> None:
    """Straps and bags on the camera side of the body."""
    look, p, sk, u = pen.look, pen.p, pen.sk, pen.u
    if look.backpack and sk.view == "front":
        for sign in (-1.0, 1.0):
            pen.line([pen.at(sign * p.shoulder_w * 0.5, p.shoulder_y - 0.012),
                      pen.at(sign * p.shoulder_w * 0.62, p.shoulder_y + 0.13)], 0.02, STRAP, "strap")  # fmt: skip
    if look.backpack and sk.view == "side":
        pen.line([pen.at(pen.f * 0.01, p.shoulder_y - 0.012), pen.at(pen.f * 0.035, p.shoulder_y + 0.1)], 0.016,
                 STRAP, "strap")  # fmt: skip
    if look.shoulder_bag:
        # strap over the person's left shoulder, bag on the right hip
        mirror = 1.0 if sk.view == "front" else -1.0
        if sk.view == "side":
            a, b = pen.at(pen.f * 0.0, p.shoulder_y - 0.01), pen.at(-pen.f * 0.02, p.hip_y - 0.02)
            bag_x = -pen.f * 0.03
        else:
            a = pen.at(mirror * p.shoulder_w * 0.55, p.shoulder_y - 0.01)
            b = pen.at(-mirror * (p.hip_w + 0.04), p.hip_y - 0.01)
            bag_x = -mirror * (p.hip_w + 0.06)
        pen.line([a, b], 0.014, STRAP, "strap")
        bx, by = pen.at(bag_x, p.hip_y - 0.03)
        w, h = 0.055 * u, 0.07 * u
        pen.polygon([(bx - w, by), (bx + w, by), (bx + w, by + h), (bx - w, by + h)], BAG2, "bag")


def _held_object(pen: Pen) -> None:
    look, p, sk = pen.look, pen.p, pen.sk
    if not look.holds_object or sk.view == "back":  # from behind, the body hides it
        return
    if sk.view == "side":
        x0 = (float(sk["left_wrist"][0]) + float(sk["right_wrist"][0])) / 2
        y = float(sk["left_wrist"][1])
        w, h = 0.03 * pen.u, 0.11 * pen.u
        pen.cv.polygon([(x0 - w, y - h * 0.6), (x0 + w, y - h * 0.6), (x0 + w, y + h * 0.4), (x0 - w, y + h * 0.4)],
                       pen.m(OBJECT), pen.t("object"))  # fmt: skip
        return
    y, w = p.shoulder_y + 0.16, 0.065
    pen.polygon([pen.at(-w, y), pen.at(w, y), pen.at(w, y + 0.1), pen.at(-w, y + 0.1)], OBJECT, "object")
