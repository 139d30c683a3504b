"""Tiny downstream datasets in their official layouts (Market-1501 and its relatives, PA-100K) and the
settings that fine-tune a tiny ViT on them in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TINY_VIT = ["backbone.spec=random:vit_tiny_patch16_224", "backbone.timm_kwargs={depth: 2, embed_dim: 64, num_heads: 2}"]


def write_image(path: Path, color: tuple[int, int, int], rng: np.random.Generator) -> None:
    """A 32x16 crop of ``color`` with noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.clip(np.array(color) + rng.normal(0, 12, (32, 16, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def id_color(pid: int) -> tuple[int, int, int]:
    """The colour of identity ``pid`` (so a re-ID model can tell identities apart)."""
    return ((pid * 67) % 256, (pid * 151) % 256, (pid * 29 + 80) % 256)


def write_market(base: Path, *, ext: str = ".jpg", duke_names: bool = False) -> Path:
    """8 training ids x 2 cameras x 2 images; 4 test ids (query cam 1, gallery cam 2); one distractor, junk."""
    rng = np.random.default_rng(0)

    def name(pid: int, cam: int, n: int) -> str:
        return f"{pid:04d}_c{cam}_f{n:07d}{ext}" if duke_names else f"{pid:04d}_c{cam}s1_{n:06d}_00{ext}"

    for pid in range(1, 9):
        for cam in (1, 2):
            for n in range(2):
                write_image(base / "bounding_box_train" / name(pid, cam, n), id_color(pid), rng)
    for pid in range(11, 15):
        write_image(base / "query" / name(pid, 1, 0), id_color(pid), rng)
        for n in range(2):
            write_image(base / "bounding_box_test" / name(pid, 2, n), id_color(pid), rng)
    write_image(base / "bounding_box_test" / name(0, 2, 9), (0, 0, 0), rng)  # distractor
    write_image(base / "bounding_box_test" / f"-1_c1s1_000001_00{ext}", (9, 9, 9), rng)  # junk
    write_image(base / "query" / f"-1_c2s1_000002_00{ext}", (9, 9, 9), rng)
    return base


def write_pa100k(root: Path, *, sizes: tuple[int, int, int] = (24, 6, 10)) -> Path:
    """annotation.mat written like MATLAB cells (scipy object arrays) + data/ images; 4 attributes."""
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    mat, offset = {}, 0
    for part, n in zip(("train", "val", "test"), sizes, strict=True):
        names = np.empty((n, 1), dtype=object)
        labels = rng.integers(0, 2, (n, 4)).astype(np.uint8)
        labels[:, 3] = 0  # an attribute without positives
        for i in range(n):
            names[i, 0] = np.array([f"{offset + i + 1:06d}.jpg"])
            write_image(
                root / "data" / names[i, 0][0], (200 * labels[i, 0], 200 * labels[i, 1], 200 * labels[i, 2]), rng
            )
        mat[f"{part}_images_name"], mat[f"{part}_label"] = names, labels
        offset += n
    attrs = np.empty((4, 1), dtype=object)
    for i, a in enumerate(["Female", "Hat", "Backpack", "boots"]):
        attrs[i, 0] = np.array([a])
    savemat(root / "annotation.mat", {**mat, "attributes": attrs})
    return root


# a re-ID fine-tune of the tiny ViT on write_market's set in seconds
TINY_REID = [
    *TINY_VIT,
    "data.img_size=[32,16]",
    "data.p_identities=4",
    "data.k_instances=2",
    "data.workers=0",
    "epochs=2",
    "optim.warmup_epochs=0.5",
    "eval.batch_size=16",
    "device=cpu",
]


def reid_overrides() -> list[str]:
    """TINY_REID with re-ranking on (k1/k2 scaled down to the tiny gallery)."""
    return [*TINY_REID, "eval.rerank=true", "eval.k1=4", "eval.k2=2"]
