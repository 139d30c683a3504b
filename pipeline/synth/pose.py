"""A 2-D walking skeleton: joint positions in pixels for a look, a view and a walking phase.

Body units: the standing person is 1 tall, x = 0 is the body's centre line, y = 0 the top of the head
and y = 1 the soles. ``skeleton`` maps them to pixels with the placement of the person in the crop.
Side views face image-left (``facing=-1``) or image-right (``+1``). A person walking toward image-right
turns their right side to the camera (their left side is the far one); walking toward image-left, the
left side is near. Front views put the person's left on image-right, back views on image-left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.synth.look import Look

# COCO keypoint order (person_keypoints_*.json "keypoints").
COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)  # fmt: skip


@dataclass(frozen=True)
class Proportions:
    head_h: float  # head height
    shoulder_w: float  # half width at the shoulders
    hip_w: float  # half width at the hips
    arm_r: float  # upper-arm radius
    thigh_r: float
    shin_r: float
    neck_y: float
    shoulder_y: float
    hip_y: float
    knee_y: float
    ankle_y: float


def proportions(look: Look) -> Proportions:
    """Body shape in body units: children have big heads and narrow shoulders, women wider hips."""
    b = look.build
    head_h = {"child": 0.165, "adult": 0.128, "elderly": 0.132}[look.age]
    shoulder = (0.092 if look.female else 0.112) * (0.85 if look.age == "child" else 1.0)
    hip = 0.084 if look.female else 0.072
    shoulder_y = head_h + 0.052
    return Proportions(
        head_h=head_h,
        shoulder_w=shoulder * (0.5 + 0.5 * b),
        hip_w=hip * b,
        arm_r=0.029 * b,
        thigh_r=0.047 * b,
        shin_r=0.033 * b,
        neck_y=head_h + 0.012,
        shoulder_y=shoulder_y,
        hip_y=0.5 + (0.02 if look.age == "child" else 0.0),
        knee_y=0.725,
        ankle_y=0.955,
    )


@dataclass
class Skeleton:
    """Joint positions in pixels (name -> (x, y)) plus what the drawing needs to know."""

    joints: dict[str, np.ndarray]
    view: str  # front | back | side
    facing: int  # side views: -1 looks toward image-left, +1 toward image-right; 0 otherwise
    height_px: float  # standing height of the person in pixels
    prop: Proportions

    def __getitem__(self, name: str) -> np.ndarray:
        return self.joints[name]

    @property
    def unit(self) -> float:
        return self.height_px

    def near_side(self) -> str:
        """In a side view, which body side faces the camera (facing image-right shows the right side)."""
        return "right" if self.facing > 0 else "left"


def _rot(length: float, angle: float, facing: int) -> np.ndarray:
    """Offset of a limb of ``length`` hanging down and swung ``angle`` radians toward ``facing``."""
    return np.array([facing * math.sin(angle) * length, math.cos(angle) * length])


def _hold_in_front(j: dict[str, np.ndarray], p: Proportions, view: str, facing: int) -> None:
    """Both forearms raised to hold something in front of the chest."""
    for side in ("left", "right"):
        sh = j[f"{side}_shoulder"]
        if view == "side":
            j[f"{side}_elbow"] = sh + np.array([facing * 0.03, 0.15])
            j[f"{side}_wrist"] = sh + np.array([facing * 0.15, 0.19])
        else:
            out = 1.0 if sh[0] > 0 else -1.0
            j[f"{side}_elbow"] = sh + np.array([out * 0.012, 0.155])
            j[f"{side}_wrist"] = np.array([out * 0.045, p.shoulder_y + 0.225])


def _side_joints(p: Proportions, facing: int, lean: float, stride: float, s: float) -> dict[str, np.ndarray]:
    """Joints in body units of a profile view at swing ``s`` (sin of the gait phase)."""
    j: dict[str, np.ndarray] = {}
    f = facing
    # A profile hides the width: both shoulders and hips sit near the centre line.
    j["head"] = np.array([f * (lean + 0.012), p.head_h / 2])
    j["neck"] = np.array([f * (lean * 0.8 + 0.004), p.neck_y])
    for side, sign in (("near", 1.0), ("far", -1.0)):
        leg = sign * s  # the two legs swing in opposition
        thigh_a = 0.36 * stride * leg
        knee_flex = stride * (0.12 + 0.6 * max(0.0, -leg))
        hip = np.array([f * lean * 0.2, p.hip_y])
        knee = hip + _rot(p.knee_y - p.hip_y, thigh_a, f)
        ankle = knee + _rot(p.ankle_y - p.knee_y, thigh_a - knee_flex, f)
        j[f"{side}_hip"], j[f"{side}_knee"], j[f"{side}_ankle"] = hip, knee, ankle
        arm_a = -0.42 * stride * leg
        shoulder = np.array([f * lean * 0.7 - sign * f * 0.004, p.shoulder_y])
        elbow = shoulder + _rot(0.165, arm_a, f)
        wrist = elbow + _rot(0.148, arm_a + 0.2 + 0.35 * stride * max(0.0, -leg), f)
        j[f"{side}_shoulder"], j[f"{side}_elbow"], j[f"{side}_wrist"] = shoulder, elbow, wrist
    # the stance foot stays on the ground: the whole body drops by what the swing shortened the legs
    drop = p.ankle_y - max(j["near_ankle"][1], j["far_ankle"][1])
    for name in list(j):
        j[name] = j[name] + np.array([0.0, drop])
    near = "right" if facing > 0 else "left"
    far = "left" if near == "right" else "right"
    for part in ("hip", "knee", "ankle", "shoulder", "elbow", "wrist"):
        j[f"{near}_{part}"] = j.pop(f"near_{part}")
        j[f"{far}_{part}"] = j.pop(f"far_{part}")
    hc, hh = j["head"], p.head_h
    j["nose"] = hc + np.array([f * 0.40 * hh, 0.1 * hh])
    j["left_eye"] = hc + np.array([f * 0.27 * hh, -0.06 * hh])
    j["right_eye"] = hc + np.array([f * 0.30 * hh, -0.06 * hh])
    j["left_ear"] = hc + np.array([-f * 0.06 * hh, 0.02 * hh])
    j["right_ear"] = hc + np.array([-f * 0.04 * hh, 0.02 * hh])
    return j


def _frontal_joints(p: Proportions, view: str, stride: float, s: float) -> dict[str, np.ndarray]:
    """Joints in body units of a front or back view at swing ``s`` (sin of the gait phase)."""
    j: dict[str, np.ndarray] = {}
    # Front: the person's left is image-right (+x); back: image-left.
    mirror = 1.0 if view == "front" else -1.0
    j["head"] = np.array([0.0, p.head_h / 2])
    j["neck"] = np.array([0.0, p.neck_y])
    for side, sign in (("left", 1.0), ("right", -1.0)):
        leg = sign * s
        x = mirror * sign
        hip = np.array([x * p.hip_w * 0.72, p.hip_y])
        knee_lift = 0.02 * stride * max(0.0, leg)
        knee = np.array([x * p.hip_w * 0.62, p.knee_y - knee_lift])
        # the leg stepping toward the camera looks longer, the one behind shorter
        ankle_dy = 0.018 * stride * leg * mirror - 0.03 * stride * max(0.0, leg)
        ankle = np.array([x * p.hip_w * 0.62, p.ankle_y + ankle_dy])
        shoulder = np.array([x * (p.shoulder_w - p.arm_r * 0.75), p.shoulder_y + 0.01])
        swing = -leg * stride
        elbow = shoulder + np.array([x * 0.03, 0.158 - 0.012 * abs(swing)])
        wrist = elbow + np.array([x * 0.016 - x * 0.02 * max(0.0, swing * mirror), 0.142 - 0.03 * abs(swing)])
        j[f"{side}_hip"], j[f"{side}_knee"], j[f"{side}_ankle"] = hip, knee, ankle
        j[f"{side}_shoulder"], j[f"{side}_elbow"], j[f"{side}_wrist"] = shoulder, elbow, wrist
    hc, hh = j["head"], p.head_h
    j["nose"] = hc + np.array([0.0, 0.1 * hh])
    j["left_eye"] = hc + np.array([mirror * 0.17 * hh, -0.05 * hh])
    j["right_eye"] = hc + np.array([-mirror * 0.17 * hh, -0.05 * hh])
    j["left_ear"] = hc + np.array([mirror * 0.36 * hh, 0.02 * hh])
    j["right_ear"] = hc + np.array([-mirror * 0.36 * hh, 0.02 * hh])
    return j


def skeleton(
    look: Look,
    view: str,
    facing: int,
    phase: float,
    stride: float,
    *,
    cx: float,
    top: float,
    height_px: float,
    jitter: np.ndarray | None = None,
) -> Skeleton:
    """Joints of ``look`` walking (``stride`` 0 = standing) at ``phase`` radians, placed in pixels.

    ``cx`` is the body centre line and ``top`` the top of the head, in pixels; ``jitter`` (17x2, body
    units) perturbs the pose so no two frames are identical.
    """
    p = proportions(look)
    lean = 0.035 if look.age == "elderly" else 0.0
    stride *= 0.6 if look.age == "elderly" else 1.0
    s = math.sin(phase)
    j = _side_joints(p, facing, lean, stride, s) if view == "side" else _frontal_joints(p, view, stride, s)
    if look.holds_object:
        _hold_in_front(j, p, view, facing)
    if jitter is not None:
        for i, name in enumerate(COCO_KEYPOINTS[5:], start=5):
            j[name] = j[name] + jitter[i]
    scale = np.array([height_px, height_px])
    origin = np.array([cx, top])
    joints = {k: origin + v * scale for k, v in j.items()}
    return Skeleton(joints=joints, view=view, facing=facing if view == "side" else 0, height_px=height_px, prop=p)
