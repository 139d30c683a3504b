"""Two-stage person searcher: a pedestrian detector, then a re-ID embedding of every detected person.

Detection is ``transfer.detection.model.build_detector`` (ViTDet simple feature pyramid + torchvision
Faster R-CNN, background + pedestrian); identity is stage 3a's BNNeck model (``transfer.reid.model``) applied
to crops resized to the re-ID input size, its BN feature L2-normalised (so the dot product the person search
metric takes is the cosine). The two share nothing but the pre-trained weights they start from, as in the
"two-step" person search methods (e.g. Chen et al., ECCV 2018; Han et al., ICCV 2019), each network
fine-tuned for its own objective and each under its own MoE prompt mix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from transfer.reid.model import ReidModel


def crop_people(image: Image.Image, boxes_xyxy: np.ndarray, transform: Callable) -> torch.Tensor:
    """(N, 3, h, w) tensor of ``transform(crop)`` for every box, boxes clipped to the image (at least 1 px)."""
    width, height = image.size
    crops = []
    for x1, y1, x2, y2 in np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4):
        left, top = min(max(0, int(np.floor(x1))), width - 1), min(max(0, int(np.floor(y1))), height - 1)
        right, bottom = max(left + 1, min(width, int(np.ceil(x2)))), max(top + 1, min(height, int(np.ceil(y2))))
        crops.append(transform(image.crop((left, top, right, bottom))))
    return torch.stack(crops) if crops else torch.zeros(0)


class TwoStageSearcher(nn.Module):
    """``detector`` (torchvision detection model) + ``reid`` (BNNeck re-ID model) with inference helpers."""

    def __init__(self, detector: nn.Module, reid: ReidModel) -> None:
        super().__init__()
        self.detector = detector
        self.reid = reid

    @torch.no_grad()
    def detect(self, images: Sequence[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Pedestrian (boxes xyxy in input pixels, scores) for each 0..1 RGB image (3, H, W)."""
        self.detector.eval()
        outputs = self.detector(list(images))
        return [(out["boxes"].float().cpu().numpy(), out["scores"].float().cpu().numpy()) for out in outputs]

    @torch.no_grad()
    def embed(self, crops: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        """L2-normalised BN features (N, D) of normalised crops (N, 3, h, w)."""
        self.reid.eval()
        dim = self.reid.bottleneck.num_features
        if len(crops) == 0:
            return np.zeros((0, dim), np.float32)
        device = next(self.reid.parameters()).device
        feats = [self.reid(crops[i : i + batch_size].to(device))[1].float() for i in range(0, len(crops), batch_size)]
        return nn.functional.normalize(torch.cat(feats), dim=1).cpu().numpy()
