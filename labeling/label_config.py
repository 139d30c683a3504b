"""Settings of ``clasp label`` (``labeling.label``): the CLIP, vocabularies, resolution and method parameters
that make a label set, and how the run is executed (batch, workers, device, precision)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pipeline.config import NON_NEGATIVE, POSITIVE, PROBABILITY, at_least
from pipeline.vocab import DEFAULT_ATTRIBUTES, DEFAULT_PARTS


@dataclass
class LabelConfig:
    root: str = "data"
    corpus: str = "synthetic"
    clip: str = "ViT-B-16:openai"  # ARCH[:TAG]; with clip_checkpoint only ARCH is used (if no config beside it)
    clip_checkpoint: str | None = None  # directory from `clasp clip-train` / open_clip local-dir, or weights file
    allow_random_weights: bool = False  # label with untrained weights (plumbing tests only)
    parts: str = str(DEFAULT_PARTS)
    attributes: str = str(DEFAULT_ATTRIBUTES)
    # (H, W) fed to CLIP; None = (2w, w) for a square CLIP of native width w (448x224 for ViT-B-16:
    # CLIP's trained scale across the shoulders, a pedestrian's 2:1 height), or the native size if not square.
    resolution: Annotated[tuple[int, int] | None, POSITIVE] = None
    label_grid: Annotated[tuple[int, int], POSITIVE] = (16, 8)  # stored part map cells (the ViT's patch grid)
    dense: Literal["auto", "value", "tokens"] = "auto"  # patch features; auto: tokens if avg-pooled, else value
    value_residual: bool = False  # MaskCLIP dense path: add the last block's input to the value path
    group_softmax: bool = True  # exclusive attribute groups share one softmax
    fg_threshold: Annotated[float, PROBABILITY] = 0.5
    foreground: Literal["both", "parts", "prompts"] = "both"  # person-vs-background prompts and/or part classes
    conf_levels: Annotated[int, at_least(2)] = 16  # part_conf levels (few: small after zstd)
    with_embed: bool = False  # --store-embeddings: also store the CLIP image embedding (fp16) as clip_embed
    batch_size: Annotated[int, POSITIVE] = 64
    workers: Annotated[int, NON_NEGATIVE] = 2
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    quiet: bool = False
