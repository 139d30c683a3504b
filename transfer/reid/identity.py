"""What re-ID and person search's embedding stage share: P x K batches of identity crops (flip, pad + crop,
random erasing), the BNNeck model's ID (label smoothing) + batch-hard triplet loss, and the loop around them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch

from pipeline.config import NON_NEGATIVE, POSITIVE
from transfer.backbone import FeatureBackbone
from transfer.data import describe_batch, per_process_batch
from transfer.loop import LoopConfig, LossFn, Training
from transfer.optim import build_optimizer
from transfer.reid.losses import ReidLoss
from transfer.reid.sampler import PKBatchSampler


@dataclass
class IdentityBatchConfig:
    """P x K batches of person crops and their training augmentation."""

    img_size: Annotated[tuple[int, int], POSITIVE] = (256, 128)  # (height, width); 384x128 is the other common setting
    p_identities: Annotated[int, POSITIVE] = 16  # identities per process (when global_batch is 0)
    k_instances: Annotated[int, POSITIVE] = 4
    global_batch: Annotated[int, NON_NEGATIVE] = 0  # >0: P x K images over all processes; P per process derived
    flip_prob: float = 0.5
    padding_px: int = 10
    erasing_prob: float = 0.5


@dataclass
class ReidLossConfig:
    label_smoothing: float = 0.1
    triplet_margin: float | None = 0.3  # null = soft margin
    id_weight: float = 1.0
    triplet_weight: float = 1.0


def transforms(
    backbone: FeatureBackbone, cfg: Any, *, train: bool, erasing: Callable[[float], Any] | None = None
) -> Any:
    """Bicubic resize to ``img_size``; in training also flip, pad + random crop and random erasing.

    ``cfg``: an ``IdentityBatchConfig`` or any config with ``img_size, flip_prob, padding_px, erasing_prob``;
    ``erasing(p)`` builds the erasing op (default: timm's per-pixel random erasing, as TransReID).
    """
    import torchvision.transforms as T
    from timm.data.random_erasing import RandomErasing

    size = tuple(cfg.img_size)
    ops: list[Any] = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        ops += [T.RandomHorizontalFlip(cfg.flip_prob), T.Pad(cfg.padding_px), T.RandomCrop(size)]
    ops += [T.ToTensor(), T.Normalize(backbone.mean, backbone.std)]
    if train and cfg.erasing_prob > 0:
        make = erasing or (lambda p: RandomErasing(probability=p, mode="pixel", max_count=1, device="cpu"))
        ops.append(make(cfg.erasing_prob))
    return T.Compose(ops)


def identities_per_process(
    batch: IdentityBatchConfig, accelerator: Any, *, key: str, quiet: bool, label: str = ""
) -> int:
    """P of the per-process P x K batch (``batch.global_batch`` split over the processes, else
    ``batch.p_identities``); the global batch is printed on the main process, after ``label``."""
    k, n = batch.k_instances, accelerator.num_processes
    size = per_process_batch(
        global_batch=batch.global_batch, batch_size=batch.p_identities * k, num_processes=n, key=key, unit=k
    )
    if accelerator.is_main_process and not quiet:
        print(f"{label}{describe_batch(size, n, batch.global_batch)}: {size // k} identities x {k} images per process")
    return size // k


def identity_training(
    accelerator: Any,
    loop: LoopConfig,
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    pids: list[int],
    *,
    identities: int,
    k_instances: int,
    workers: int,
    seed: int,
) -> Training:
    """P x K loader over ``dataset`` (``pids[i]`` the identity of item i), optimiser and schedule, prepared."""
    sampler = PKBatchSampler(pids, identities, k_instances, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    steps_per_epoch = loop.cap(math.ceil(len(sampler) / accelerator.num_processes))
    optimizer, schedule = build_optimizer(model, loop.optim, steps_per_epoch=steps_per_epoch, epochs=loop.epochs)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return Training(model, optimizer, schedule, loader, steps_per_epoch, sampler.set_epoch)


def id_triplet_loss(cfg: ReidLossConfig) -> LossFn:
    """Identity cross-entropy on the BNNeck logits + batch-hard triplet on the pooled feature."""
    criterion = ReidLoss(
        label_smoothing=cfg.label_smoothing,
        triplet_margin=cfg.triplet_margin,
        id_weight=cfg.id_weight,
        triplet_weight=cfg.triplet_weight,
    )

    def loss_fn(net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, feats = net(images)
        return criterion(logits, feats, targets)

    return loss_fn
