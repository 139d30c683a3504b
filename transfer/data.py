"""Data pieces every transfer task shares: an image-file dataset, and what a batch means over processes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch

from pipeline.config import NON_NEGATIVE, POSITIVE
from pipeline.errors import ClaspError


@dataclass
class BatchConfig:
    """Base of a task's ``data`` settings when it trains on plain shuffled batches."""

    batch_size: Annotated[int, POSITIVE] = 64  # images per process per step (when global_batch is 0)
    global_batch: Annotated[int, NON_NEGATIVE] = 0  # >0: images per step over all processes (per-process derived)
    workers: int = 8  # DataLoader worker processes


def read_rgb(path: str) -> Any:
    """The image at ``path`` as an RGB PIL image; an unreadable file is a ClaspError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as exc:
        raise ClaspError(f"cannot read image {path}: {exc}") from None


class ImageDataset(torch.utils.data.Dataset):
    """(image path, target) pairs -> (transformed RGB tensor, target, index)."""

    def __init__(self, paths: Sequence[str], targets: Sequence[Any], transform: Callable) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths, self.targets, self.transform = list(paths), targets, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any, int]:
        return self.transform(read_rgb(self.paths[index])), self.targets[index], index


def per_process_batch(*, global_batch: int, batch_size: int, num_processes: int, key: str, unit: int = 1) -> int:
    """Images per process per step. ``global_batch > 0`` is the recipe's batch over all processes (what a paper
    row states, so its lr stays right on 1 or 8 GPUs): each process takes ``global_batch / num_processes``,
    which must be a whole number of ``unit`` (e.g. K images per identity). ``global_batch = 0`` keeps
    ``batch_size`` per process (the global batch then grows with the number of processes)."""
    if global_batch <= 0:
        return batch_size
    if global_batch % (num_processes * unit):
        raise ClaspError(
            f"{key}={global_batch} does not split over {num_processes} processes"
            + (f" in whole groups of {unit}" if unit > 1 else "")
            + f"; use a multiple of {num_processes * unit} or another number of processes"
        )
    return global_batch // num_processes


def describe_batch(per_process: int, num_processes: int, global_batch: int) -> str:
    """The line printed at start, e.g. ``global batch 512 = 8 processes x 64 (set by the config)``."""
    source = "set by the config" if global_batch > 0 else "per-process batch_size x processes"
    return f"global batch {per_process * num_processes} = {num_processes} processes x {per_process} ({source})"
