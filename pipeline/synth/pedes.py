"""A synthetic CUHK-PEDES (text-based person search) set in the real dataset's layout.

    from pipeline.synth.pedes import write_cuhk_pedes
    write_cuhk_pedes(Path("data/synth/CUHK-PEDES"), seed=0, train_ids=64, val_ids=16, test_ids=16)

Output (``out_dir`` is the CUHK-PEDES root, as IRRA's ``datasets/cuhkpedes.py`` reads it)::

    imgs/CUHK01/<id:04d><n:03d>.jpg     one pedestrian crop each (real: CUHK01/CUHK03/Market/SSM/VIPeR crops)
    reid_raw.json                       [{"split", "id", "file_path", "captions", "processed_tokens"}, ...]
    pedes_synth.json                    arguments and counts (not in the real set)

Identities are numbered 1..N over train, then val, then test (real: 11,003 / 1,000 / 1,000). Each person is
seen by 2-4 different cameras (group 7, apart from the other sets') and every image gets ``captions_per_image``
descriptions (real: 2, by different annotators) in different wordings drawn from ``STYLES``: the same facts
— who, hair, garments, shoes, hat/glasses, bags — as the world's captions, told as one phrase, as sentences with
pronouns, or garment-first, and only what the image shows (no glasses or held box from behind).
The set is built in a hidden sibling folder and renamed into place at the end; a finished folder with the
same arguments is reused.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import ClaspError
from pipeline.synth.look import Look, caption, caption_parts, random_look
from pipeline.synth.render import random_shot, render_shot
from pipeline.synth.scene import make_camera

CAMERA_GROUP = 7
SUMMARY = "pedes_synth.json"
ANNOTATION = "reid_raw.json"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _pronoun(look: Look) -> str:
    return "she" if look.female else "he"


def _the(subject: str) -> str:
    return "the " + subject.split(" ", 1)[1]  # 'an elderly man' -> 'the elderly man'


def _sentences(look: Look, view: str) -> str:
    """'The woman has long black hair. She is wearing ... She is carrying ...'"""
    p = caption_parts(look, view)
    he = _pronoun(look).capitalize()
    hair = str(p["hair"]).removeprefix("with ")
    text = _the(str(p["subject"])).capitalize() + (f" has {hair}. {he}" if hair else "")
    text += f" is wearing {_join([p['top'], p['lower'], p['shoes']])}."
    if p["extras"]:
        text += f" {he} also wears {_join(p['extras'])}."
    if p["carry"]:
        text += f" {he} is carrying {_join(p['carry'])}."
    return text


def _garment_first(look: Look, view: str) -> str:
    """'A red short-sleeved t-shirt and blue jeans on a woman with long black hair, with white sneakers ...'"""
    p = caption_parts(look, view)
    text = f"{str(p['top']).capitalize()} and {p['lower']} on {p['subject']}"
    text += f" {p['hair']}" if p["hair"] else ""
    things = [str(p["shoes"]), *p["extras"], *p["carry"]]
    return text + f", with {_join(things)}."


def _walking(look: Look, view: str) -> str:
    """'This man, walking away from the camera, wears ... His shoes are black boots ...'"""
    p = caption_parts(look, view)
    motion = {"front": "walking toward the camera", "back": "walking away from the camera", "side": "walking past"}
    his = "her" if look.female else "his"
    text = f"This {str(p['subject']).split(' ', 1)[1]}, {motion[view]}, wears {p['top']} with {p['lower']}."
    text += f" {his.capitalize()} shoes are {p['shoes']}"
    text += f" and {_pronoun(look)} has {str(p['hair']).removeprefix('with ')}." if p["hair"] else "."
    if p["extras"] or p["carry"]:
        text += f" {_pronoun(look).capitalize()} has {_join([*p['extras'], *p['carry']])}."
    return text


STYLES = (
    lambda look, view: caption(look, view, 0),  # the world's own caption (pairs.csv wording)
    lambda look, view: caption(look, view, 2),  # 'a photo of ..., seen from behind'
    _sentences,
    _garment_first,
    _walking,
)


def describe(look: Look, view: str, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` captions of one image, each in a different style (``count`` <= len(STYLES))."""
    return [STYLES[int(i)](look, view) for i in rng.choice(len(STYLES), size=count, replace=False)]


def write_cuhk_pedes(
    out_dir: Path,
    *,
    seed: int,
    train_ids: int = 64,
    val_ids: int = 16,
    test_ids: int = 16,
    cameras: int = 6,
    images_per_id: tuple[int, int] = (2, 4),
    captions_per_image: int = 2,
    heights: tuple[int, int] = (128, 256),
    overwrite: bool = False,
) -> Path:
    """Write a synthetic CUHK-PEDES set (real layout) to ``out_dir`` and return it; deterministic in its arguments."""
    out_dir = Path(out_dir)
    args = {"seed": seed, "train_ids": train_ids, "val_ids": val_ids, "test_ids": test_ids, "cameras": cameras,
            "images_per_id": list(images_per_id), "captions_per_image": captions_per_image,
            "heights": list(heights)}  # fmt: skip
    lo, hi = images_per_id
    if min(train_ids, test_ids) < 2 or val_ids < 0 or not 1 <= lo <= hi <= cameras:
        raise ClaspError(f"write_cuhk_pedes: need >= 2 train/test ids, val_ids >= 0, 1 <= images <= cameras: {args}")
    if not 1 <= captions_per_image <= len(STYLES) or not 32 <= heights[0] <= heights[1]:
        raise ClaspError(f"write_cuhk_pedes: captions_per_image in 1..{len(STYLES)}, 32 <= heights: {args}")
    if out_dir.exists():
        previous = out_dir / SUMMARY
        if previous.is_file() and json.loads(previous.read_text()).get("args") == args and not overwrite:
            return out_dir
        if any(out_dir.iterdir()) and not overwrite:
            raise ClaspError(f"{out_dir} already holds other data; pass overwrite=True or choose another folder")
    tmp = out_dir.parent / f".{out_dir.name}-partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "imgs" / "CUHK01").mkdir(parents=True)
    cams = [make_camera(seed, k, group=CAMERA_GROUP) for k in range(cameras)]
    splits = ["train"] * train_ids + ["val"] * val_ids + ["test"] * test_ids
    entries = []
    for pid, split in enumerate(splits, start=1):
        rng = np.random.default_rng([seed, CAMERA_GROUP, pid])
        look = random_look(rng)
        for n, cam in enumerate(sorted(rng.choice(cameras, size=int(rng.integers(lo, hi + 1)), replace=False))):
            camera = cams[int(cam)]
            height = int(round(np.exp(rng.uniform(np.log(heights[0]), np.log(heights[1])))))
            width = max(16, int(round(height * rng.uniform(0.36, 0.5))))
            sample = render_shot(look, camera, random_shot(rng, camera), height, width)
            rel = f"CUHK01/{pid:04d}{n + 1:03d}.jpg"
            buffer = io.BytesIO()
            Image.fromarray(sample.rgb).save(buffer, format="JPEG", quality=camera.jpeg_quality)
            (tmp / "imgs" / rel).write_bytes(buffer.getvalue())
            captions = describe(look, sample.view, rng, captions_per_image)
            tokens = [re.findall(r"[a-z0-9]+|[^\sa-z0-9]", c.lower()) for c in captions]
            entries.append({"split": split, "captions": captions, "file_path": rel, "processed_tokens": tokens,
                            "id": pid})  # fmt: skip
    (tmp / ANNOTATION).write_text(json.dumps(entries, indent=1) + "\n")
    counts = {
        s: {"ids": splits.count(s), "images": sum(e["split"] == s for e in entries)} for s in dict.fromkeys(splits)
    }
    (tmp / SUMMARY).write_text(json.dumps({"dataset": "cuhk-pedes (synthetic)", "args": args, "counts": counts}) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir
