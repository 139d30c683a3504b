"""Re-ID losses: identity cross-entropy with label smoothing + batch-hard triplet (Hermans et al. 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def batch_hard_triplet(features: torch.Tensor, pids: torch.Tensor, margin: float | None) -> torch.Tensor:
    """Hardest positive and hardest negative per anchor on Euclidean distances of un-normalised features.

    ``margin`` = None uses the soft margin log(1 + exp(d_ap - d_an)) (SOLIDER's MSMT17 setting).
    """
    dist = torch.cdist(features, features).clamp(min=1e-12)
    same = pids[:, None] == pids[None, :]
    hardest_pos = dist.masked_fill(~same, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(dim=1)
    gap = hardest_pos - hardest_neg
    return F.softplus(gap).mean() if margin is None else F.relu(gap + margin).mean()


class ReidLoss(nn.Module):
    def __init__(
        self, *, label_smoothing: float, triplet_margin: float | None, id_weight: float, triplet_weight: float
    ) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.triplet_margin = triplet_margin
        self.id_weight, self.triplet_weight = id_weight, triplet_weight

    def forward(self, logits: torch.Tensor, features: torch.Tensor, pids: torch.Tensor) -> dict[str, torch.Tensor]:
        id_loss = F.cross_entropy(logits.float(), pids, label_smoothing=self.label_smoothing)
        tri_loss = batch_hard_triplet(features.float(), pids, self.triplet_margin)
        total = self.id_weight * id_loss + self.triplet_weight * tri_loss
        return {"loss": total, "id": id_loss.detach(), "triplet": tri_loss.detach()}
