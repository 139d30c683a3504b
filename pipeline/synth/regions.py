"""Region-caption pairs: body-part and background crops of a corpus image with a phrase for each.

A CLIP trained on whole-person captions only never learns what a *part* of the image is called, so
its patch tokens cannot give part labels (the tiny CLIP's part mIoU was below a geometry-only
baseline). The synthetic world knows every pixel's part class and every garment's words, so next
to each image's caption it can describe regions of it: the box around the person's shoes is
"brown boots", the upper body "a grey long-sleeved sweater", a strip of street "the background".
`clasp clip-train` crops to the box (the ``box`` column of pairs.csv). With an average-pooled
image tower the image embedding is the mean of the projected patch tokens, so the region pairs
teach exactly the tokens the dense labeler reads.

Boxes are the tight box of the part's pixels grown to the CLIP input's aspect ratio around its
centre (so a crop is not stretched), clamped to the image.
"""

from __future__ import annotations

import numpy as np

import pipeline.synth.pen as pen
from pipeline.synth.look import Look, _hat_phrase, _lower_phrase, _shoe_phrase, _top_phrase

Box = tuple[int, int, int, int]

MIN_PIXELS = 24  # smaller regions (a sliver of an arm) are not described
_BACKGROUND_PHRASES = ("the background", "an empty street")


def region_caption(part: int, look: Look, view: str, pick: int) -> str | None:
    """Phrase for a region of class ``part`` (ids of data_manifests/parts.yaml); ``pick`` varies wording."""
    if part == pen.BACKGROUND:
        return _BACKGROUND_PHRASES[pick % len(_BACKGROUND_PHRASES)]
    if part == pen.HEAD:
        if pick % 2 and look.hat is not None:
            return _hat_phrase(look)
        if pick % 2 and look.hair_style != "bald":
            return f"{look.hair_color} hair"
        return "a person's head"
    if part == pen.FACE:
        return (
            f"a person's face with {look.glasses}"
            if look.glasses and view != "back" and pick % 2
            else "a person's face"
        )
    if part == pen.UPPER:
        return _top_phrase(look)
    if part == pen.ARMS:
        return "a person's arm"
    if part == pen.LOWER_CLOTHES:
        return _lower_phrase(look)
    if part == pen.LEGS:
        return "a person's legs"
    if part == pen.SHOES:
        return _shoe_phrase(look)
    if part == pen.ACCESSORIES:
        bags = [
            name
            for name, has in (
                ("backpack", look.backpack),
                ("shoulder bag", look.shoulder_bag),
                ("handbag", look.handbag),
            )
            if has
        ]
        if bags:
            return f"a {look.bag_color} {bags[pick % len(bags)]}"
        return "a box" if look.holds_object else None
    return None


def grow_to_aspect(box: Box, aspect: float, width: int, height: int) -> Box:
    """``box`` grown around its centre until height / width == ``aspect`` (as far as the image allows)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if h < aspect * w:
        h = min(height, round(aspect * w))
    else:
        w = min(width, round(h / aspect))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    nx0 = int(min(max(0, round(cx - w / 2)), width - w))
    ny0 = int(min(max(0, round(cy - h / 2)), height - h))
    return nx0, ny0, nx0 + w, ny0 + h


def _background_box(person: np.ndarray) -> Box | None:
    """The widest full-height strip of columns (or, failing that, the tallest top band) with no person pixel."""
    height, width = person.shape
    empty_cols = ~person.any(axis=0)
    best, start = (0, 0, 0), None
    for x, empty in enumerate([*empty_cols.tolist(), False]):
        if empty and start is None:
            start = x
        elif not empty and start is not None:
            best = max(best, (x - start, start, x))
            start = None
    if best[0] >= max(4, width // 8):
        return best[1], 0, best[2], height
    top = int(np.argmax(person.any(axis=1))) if person.any() else height
    if top >= max(4, height // 8):
        return 0, 0, width, top
    return None


def region_pairs(
    part_mask: np.ndarray, look: Look, view: str, *, count: int, pick: int, aspect: float = 2.0
) -> list[tuple[Box, str]]:
    """Up to ``count`` (box, phrase) pairs of the regions present in ``part_mask`` (H, W class ids).

    Which regions an image contributes rotates with ``pick`` over the classes present, so across the
    corpus every part (and the background) is described about equally often.
    """
    height, width = part_mask.shape
    candidates: list[tuple[Box, int]] = []
    background = _background_box(part_mask > 0)
    if background is not None:  # a strip of street, cut to the input's aspect at a varying place
        x0, y0, x1, y1 = background
        w = min(x1 - x0, max(1, round((y1 - y0) / aspect)))
        h = min(y1 - y0, max(1, round(aspect * w)))
        nx0, ny0 = x0 + (pick * 13) % (x1 - x0 - w + 1), y0 + (pick * 37) % (y1 - y0 - h + 1)
        candidates.append(((nx0, ny0, nx0 + w, ny0 + h), pen.BACKGROUND))
    counts = np.bincount(part_mask.ravel(), minlength=pen.ACCESSORIES + 1)
    for part in range(1, pen.ACCESSORIES + 1):
        if counts[part] < MIN_PIXELS:
            continue
        ys, xs = np.nonzero(part_mask == part)
        tight = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        candidates.append((grow_to_aspect(tight, aspect, width, height), part))
    out: list[tuple[Box, str]] = []
    for j in range(min(count, len(candidates))):
        box, part = candidates[(pick * count + j) % len(candidates)]
        text = region_caption(part, look, view, pick + j)
        if text is not None:
            out.append((box, text))
    return out
