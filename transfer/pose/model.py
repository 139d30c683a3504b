"""Top-down pose model: backbone feature map (1/16) -> ViTPose decoder -> one heatmap per joint at 1/4.

Decoders (ViTPose, Xu et al. NeurIPS 2022):
- ``classic``: two 4x4 stride-2 deconvolutions (each + BN + ReLU, ``channels`` wide) and a 1x1 conv;
  ViTPose's default head;
- ``simple``: ReLU, bilinear x4 upsampling and a 3x3 conv, ViTPose's "simple decoder" showing that
  the plain ViT features carry the pose.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from transfer.backbone import FeatureBackbone


class PoseHead(nn.Module):
    def __init__(
        self, in_channels: int, num_joints: int, *, kind: Literal["classic", "simple"] = "classic", channels: int = 256
    ) -> None:
        super().__init__()
        if kind == "classic":
            layers: list[nn.Module] = []
            width = in_channels
            for _ in range(2):
                layers += [
                    nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(channels),
                    nn.ReLU(inplace=True),
                ]
                width = channels
            layers.append(nn.Conv2d(channels, num_joints, 1))
        else:
            layers = [
                nn.ReLU(),
                nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, num_joints, 3, padding=1),
            ]
        self.layers = nn.Sequential(*layers)
        self.upsample = 4
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d | nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class PoseModel(nn.Module):
    """``forward(images (B, 3, H, W)) -> heatmaps (B, K, H * 4 / patch, W * 4 / patch)``."""

    def __init__(
        self, backbone: FeatureBackbone, num_joints: int, *, head: str = "classic", channels: int = 256
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = PoseHead(backbone.num_features, num_joints, kind=head, channels=channels)  # type: ignore[arg-type]

    @property
    def stride(self) -> int:
        """Input pixels per heatmap pixel."""
        return self.backbone.patch_size // self.head.upsample

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.feature_maps(images, indices=1)[-1])

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
