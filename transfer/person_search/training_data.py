"""What the two person-search stages train on: whole scenes with their boxes (detector) and ground-truth crops
of the labelled identities (re-ID embedding)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from transfer.data import read_rgb
from transfer.person_search.datasets import SceneAnnotation
from transfer.person_search.model import crop_people


def read_tensor(path: str) -> torch.Tensor:
    """The image at ``path`` as a (3, H, W) float tensor in 0..1."""
    return torch.from_numpy(np.asarray(read_rgb(path)).copy()).permute(2, 0, 1).float().div(255.0)


class SceneDataset(torch.utils.data.Dataset):
    """Training scenes -> (0..1 RGB tensor, {"boxes", "labels", "size"}, index), random horizontal flip."""

    def __init__(self, scenes: list[SceneAnnotation], *, flip_prob: float) -> None:
        self.scenes, self.flip_prob = scenes, flip_prob

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        scene = self.scenes[index]
        image = read_tensor(scene.path)
        boxes = torch.as_tensor(scene.boxes_xyxy, dtype=torch.float32).reshape(-1, 4).clone()
        width = image.shape[-1]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.shape[-2])
        if torch.rand(()) < self.flip_prob:
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        target = {
            "boxes": boxes,
            "labels": torch.ones(len(boxes), dtype=torch.int64),
            "size": torch.tensor(image.shape[-2:]),
        }
        return image, target, index


def collate_scenes(batch: list) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]], torch.Tensor]:
    """Pad to the largest image of the batch (bottom/right); each target keeps its image's true ``size``."""
    height = max(image.shape[1] for image, _, _ in batch)
    width = max(image.shape[2] for image, _, _ in batch)
    images = torch.zeros(len(batch), 3, height, width)
    for i, (image, _, _) in enumerate(batch):
        images[i, :, : image.shape[1], : image.shape[2]] = image
    return images, [t for _, t, _ in batch], torch.tensor([i for _, _, i in batch])


class CropDataset(torch.utils.data.Dataset):
    """(scene path, box xyxy, label) -> (transformed crop, label, index)."""

    def __init__(self, items: list[tuple[str, np.ndarray, int]], transform: Any) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path, box, label = self.items[index]
        return crop_people(read_rgb(path), box[None], self.transform)[0], label, index
