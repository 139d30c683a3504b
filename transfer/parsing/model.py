"""Parsing model: ViT backbone + a multi-level fuse / progressive-upsampling segmentation head.

Head (this project's small design, between SETR's MLA and PUP decoders): the maps of several backbone
blocks (``FeatureBackbone.feature_maps``, stride 16, final norm applied) are each projected by a 1x1
conv + BN + ReLU to ``dim`` channels and concatenated (multi-level, as SETR-MLA), fused by a 3x3 conv +
BN + ReLU, then upsampled twice by x2 bilinear + 3x3 conv + BN + ReLU (progressive, as SETR-PUP) to
stride 4, where a 1x1 conv gives the class logits; they are upsampled bilinearly to the input size.
Inputs whose sides are not multiples of the patch size (LIP's 473x473) are zero-padded on the
bottom/right (zero = the mean colour after normalisation) and the logits are cropped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ClaspError
from transfer.backbone import FeatureBackbone


def default_levels(depth: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced block indices ending at the last block (depth 12 -> [2, 5, 8, 11])."""
    return sorted({max(0, round(depth * (k + 1) / count) - 1) for k in range(count)})


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ParsingHead(nn.Module):
    def __init__(self, in_channels: int, levels: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.project = nn.ModuleList(_conv_bn_relu(in_channels, dim, 1) for _ in range(levels))
        self.fuse = _conv_bn_relu(dim * levels, dim, 3)
        self.up = nn.ModuleList(_conv_bn_relu(dim, dim, 3) for _ in range(2))
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        x = self.fuse(torch.cat([proj(m) for proj, m in zip(self.project, maps, strict=True)], dim=1))
        for conv in self.up:
            x = conv(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        return self.classifier(x)


class ParsingModel(nn.Module):
    """``forward(images (B, 3, H, W)) -> logits (B, num_classes, H, W)``."""

    def __init__(self, backbone: FeatureBackbone, num_classes: int, *, levels: list[int], dim: int) -> None:
        super().__init__()
        depth = len(getattr(backbone.model, "blocks", ()))
        if depth == 0:
            raise ClaspError(f"backbone '{backbone.source}' has no ViT blocks; the parsing head reads ViT block maps")
        levels = list(levels) or default_levels(depth)
        bad = [i for i in levels if not -depth <= i < depth]
        if bad:
            raise ClaspError(f"head.levels {bad} are outside the backbone's {depth} blocks (0..{depth - 1})")
        self.backbone = backbone
        self.levels = sorted({i % depth for i in levels})
        self.head = ParsingHead(backbone.num_features, len(self.levels), dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        patch = self.backbone.patch_size
        pad_h, pad_w = (-height) % patch, (-width) % patch
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        logits = self.head(self.backbone.feature_maps(images, self.levels))
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
