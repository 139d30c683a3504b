"""The text-search model: the transferred backbone as image tower, a CLIP text tower, one joint embedding space.

Image side: ``FeatureBackbone`` pooled feature -> linear projection to the text tower's embedding width
(IRRA uses CLIP's own image tower; here the backbone under test replaces it, so its projection is new).
Text side: an open_clip model with its image tower removed, ``encode_text`` as open_clip defines it (end-of-text
token, final norm, text projection). ``text.clip`` names it the way ``clasp label --clip`` does:

- ``ARCH:TAG`` (``ViT-B-16:openai``): open_clip's pretrained weights (needs the download or the local cache);
- ``text.checkpoint: DIR|FILE``: a local CLIP, e.g. the folder ``clasp clip-train`` writes in the synthetic world;
- ``ARCH`` alone (``clasp-vit-tiny-8``): random weights built in-process, for plumbing runs; only trainable
  (``text.freeze: true`` with random weights is refused: a frozen random tower cannot learn anything).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.errors import ClaspError
from transfer.backbone import FeatureBackbone


@dataclass
class TextTowerConfig:
    clip: str = "ViT-B-16:openai"  # ARCH[:TAG]; with `checkpoint` only ARCH matters (a bare file needs it)
    checkpoint: str | None = None  # local CLIP: a clasp clip-train output folder or a weights file of ARCH
    freeze: bool = False  # IRRA fine-tunes the text tower; frozen keeps CLIP's text space fixed


class TextTower(nn.Module):
    """An open_clip CLIP without its image tower: ``forward(tokens) -> (B, embed_dim)`` text embeddings."""

    def __init__(self, clip: nn.Module, *, frozen: bool) -> None:
        super().__init__()
        clip.visual = None  # never used for text; dropping it keeps its weights out of the optimiser and the file
        self.clip = clip
        self.frozen = frozen
        if frozen:
            self.clip.requires_grad_(False)
        self.embed_dim = int(clip.encode_text(torch.zeros(1, self.context_length, dtype=torch.long)).shape[-1])

    @property
    def context_length(self) -> int:
        return int(getattr(self.clip, "context_length", 77))

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode and not self.frozen)
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)


def build_text_tower(cfg: TextTowerConfig) -> tuple[TextTower, Any, dict[str, Any]]:
    """(text tower, its tokenizer, provenance for results.json)."""
    import open_clip

    from labeling.clip_model import load_clip, parse_clip_spec

    arch, tag = parse_clip_spec(cfg.clip)
    if cfg.checkpoint is None and tag is None:
        if cfg.freeze:
            raise ClaspError(
                f"text.clip={cfg.clip} has no weights (ARCH without :TAG) and text.freeze=true: a frozen random text "
                "tower cannot learn; give ARCH:TAG or text.checkpoint=DIR, or set text.freeze=false"
            )
        try:
            clip = open_clip.create_model(arch)
        except RuntimeError as exc:
            raise ClaspError(f"text.clip={cfg.clip}: {exc}; see open_clip.list_models()") from None
        tokenizer = open_clip.get_tokenizer(arch)
        identity = {"arch": arch, "weights": "random (built in-process)", "weights_id": "random"}
    else:
        try:
            loaded = load_clip(cfg.clip, cfg.checkpoint)
        except ClaspError as exc:  # the loader speaks of `clasp label`'s flags; name this task's settings
            message = str(exc).replace("--clip-checkpoint PATH", "text.checkpoint=PATH")
            message = message.replace("--clip-checkpoint ", "text.checkpoint=")
            raise ClaspError(f"text tower: {message}") from None
        clip, tokenizer = loaded.model, loaded.tokenizer
        identity = {"arch": loaded.identity.arch, "weights": loaded.identity.weights,
                    "weights_id": loaded.identity.weights_id}  # fmt: skip
    tower = TextTower(clip.float().train(), frozen=cfg.freeze)
    return tower, tokenizer, {**identity, "frozen": cfg.freeze, "embed_dim": tower.embed_dim}


class TextSearchModel(nn.Module):
    """Image and text embeddings in one space; an optional identity classifier shared by both (IRRA's ID loss)."""

    def __init__(self, backbone: FeatureBackbone, text: TextTower, num_train_ids: int, *, id_head: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.image_proj = nn.Linear(backbone.num_features, text.embed_dim)
        self.text = text
        self.classifier = nn.Linear(text.embed_dim, num_train_ids) if id_head else None
        if self.classifier is not None:  # IRRA's initialisation of its identity classifier
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.backbone(images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(tokens)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embeddings ``image``/``text`` and, with the ID head, ``image_logits``/``text_logits``: everything the
        losses use comes out of one forward, so DDP sees every trained parameter used there."""
        out = {"image": self.encode_image(images).float(), "text": self.encode_text(tokens).float()}
        if self.classifier is not None:
            out["image_logits"], out["text_logits"] = self.classifier(out["image"]), self.classifier(out["text"])
        return out
