"""Region-caption pairs of the synthetic world (pipeline.synth.regions): boxes hold their part, phrases name it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.synth import pen
from pipeline.synth.look import _lower_phrase, _shoe_phrase, _top_phrase, random_look
from pipeline.synth.regions import grow_to_aspect, region_caption, region_pairs


def _toy_mask() -> np.ndarray:
    """A 64x32 'person' with a street strip on the left: head, upper, lower clothes, shoes."""
    mask = np.zeros((64, 32), dtype=np.uint8)
    mask[2:10, 14:22] = pen.HEAD
    mask[10:30, 10:26] = pen.UPPER
    mask[30:54, 11:25] = pen.LOWER_CLOTHES
    mask[54:60, 11:25] = pen.SHOES
    return mask


@pytest.mark.parametrize("box", [(3, 5, 9, 7), (0, 0, 4, 60), (20, 50, 32, 64)])
def test_grow_to_aspect_keeps_the_box_inside_and_the_image_bounds(box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = grow_to_aspect(box, 2.0, 32, 64)
    assert 0 <= x0 <= box[0] and 0 <= y0 <= box[1] and box[2] <= x1 <= 32 and box[3] <= y1 <= 64
    w, h = x1 - x0, y1 - y0
    assert h == 64 or w == 32 or abs(h / w - 2.0) < 0.2


def test_regions_cover_every_part_and_the_background_with_their_phrases() -> None:
    look = random_look(np.random.default_rng(3))
    mask = _toy_mask()
    seen: dict[str, tuple[int, int, int, int]] = {}
    for pick in range(10):
        for box, text in region_pairs(mask, look, "front", count=2, pick=pick):
            seen[text] = box
    assert _top_phrase(look) in seen and _lower_phrase(look) in seen and _shoe_phrase(look) in seen
    assert {"the background", "an empty street"} & set(seen)
    for part, text in ((pen.UPPER, _top_phrase(look)), (pen.SHOES, _shoe_phrase(look))):
        x0, y0, x1, y1 = seen[text]
        ys, xs = np.nonzero(mask == part)
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
    background = next(seen[t] for t in ("the background", "an empty street") if t in seen)
    x0, y0, x1, y1 = background
    assert not mask[y0:y1, x0:x1].any()  # no person pixel in a background region


def test_tiny_or_absent_parts_are_not_described() -> None:
    look = random_look(np.random.default_rng(0))
    mask = np.zeros((64, 32), dtype=np.uint8)
    mask[:, 2:32] = pen.UPPER  # no background strip wide enough (2 columns), no top band
    mask[0:3, 10:13] = pen.ARMS  # 9 pixels: too small
    texts = [t for pick in range(6) for _, t in region_pairs(mask, look, "front", count=2, pick=pick)]
    assert set(texts) == {_top_phrase(look)}
    bare = dataclasses.replace(look, backpack=False, shoulder_bag=False, handbag=False, holds_object=False)
    assert region_caption(pen.ACCESSORIES, bare, "front", 0) is None
    bag = dataclasses.replace(bare, backpack=True, bag_color="red")
    assert region_caption(pen.ACCESSORIES, bag, "front", 0) == "a red backpack"
