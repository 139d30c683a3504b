"""BNNeck re-ID head (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person Re-ID", 2019).

The pooled backbone feature feeds the triplet loss; a BatchNorm (bias frozen at 0) maps it to the
feature the identity classifier (bias-free linear) sees. At test time the feature is the BN output
(``after_bn``, the strong-baseline / TransReID default) or the raw pooled one (``before_bn``).
"""

from __future__ import annotations

import torch
from torch import nn

from transfer.backbone import FeatureBackbone


class ReidModel(nn.Module):
    def __init__(self, backbone: FeatureBackbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.num_features
        self.bottleneck = nn.BatchNorm1d(dim)
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: (identity logits, pre-BN feature). Eval: (pre-BN feature, post-BN feature)."""
        feat = self.backbone(images)
        bn_feat = self.bottleneck(feat)
        if self.training:
            return self.classifier(bn_feat), feat
        return feat, bn_feat

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
