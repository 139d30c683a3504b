"""Labeling with a tiny random CLIP: its open_clip folder, small ingested corpora, the label settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from labeling.label import LabelConfig
from pipeline.ingest import IngestConfig, ingest

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": [64, 32], "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_clip_dir(
    path: Path, *, seed: int = 0, zero_pos: bool = False, pool: str = "tok", arch: str = "test-tiny"
) -> Path:
    """A random tiny CLIP in open_clip's local-dir layout (labels are meaningless; the plumbing is real);
    ``zero_pos`` makes patch features position-free."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "pool_type": pool}}
    model = open_clip.CLIP(**cfg)
    if zero_pos:
        with torch.no_grad():
            model.visual.positional_embedding.zero_()
    torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    config = {"arch": arch, "model_cfg": cfg, "preprocess_cfg": {}}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    return path


def ingest_folder(images: dict[str, np.ndarray], root: Path, corpus: str, per_shard: int) -> Path:
    """Write ``images`` (relative name -> HxWx3 array) as files and ingest them as ``corpus`` under ``root``."""
    src = root / f"src-{corpus}"
    for name, arr in images.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(src / name, **({"quality": 95} if name.endswith(".jpg") else {}))
    ingest(
        IngestConfig(source=str(src), corpus=corpus, root=str(root), images_per_shard=per_shard, workers=1, quiet=True)
    )
    return root


def noise_images(n: int, seed: int = 0, size: tuple[int, int] = (64, 32)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"cam{i % 3}/img{i:03d}.jpg": rng.integers(0, 256, (*size, 3), dtype=np.uint8) for i in range(n)}


def label_cfg(root: Path, corpus: str, clip_dir: Path, **kw) -> LabelConfig:  # noqa: ANN003
    """Label settings for a tiny CLIP on the CPU in this process; ``kw`` overrides any of them."""
    base = dict(
        root=str(root),
        corpus=corpus,
        clip_checkpoint=str(clip_dir),
        allow_random_weights=True,
        resolution=(64, 32),
        workers=0,
        batch_size=8,
        quiet=True,
    )
    base.update(kw)
    return LabelConfig(**base)
