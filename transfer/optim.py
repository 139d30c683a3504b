"""Fine-tune optimisation: a timm optimiser (layer-wise lr decay when the backbone asks for it) and a per-step
linear warm-up + cosine schedule (TransReID's defaults)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from torch import nn

from pipeline.config import NON_NEGATIVE, POSITIVE
from transfer.backbone import FeatureBackbone, layer_lr_scales

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: Annotated[float, POSITIVE] = 0.008
    weight_decay: Annotated[float, NON_NEGATIVE] = 1e-4
    momentum: float = 0.9
    warmup_epochs: Annotated[float, NON_NEGATIVE] = 5.0
    warmup_lr_factor: float = 0.01  # warmup starts at lr * factor
    min_lr_factor: float = 0.002  # cosine ends at lr * factor (TransReID's defaults)
    grad_clip: Annotated[float, NON_NEGATIVE] = 0.0  # max grad norm; 0 = off


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, steps_per_epoch: int, epochs: int) -> tuple[Any, Any]:
    """timm optimiser (no weight decay on norms, biases, embeddings) and a per-step warmup + cosine schedule.

    A backbone built with ``layer_decay < 1`` gets per-layer lr multipliers (``lr_scale`` param groups, which
    timm's schedulers apply at every step).
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    params: Any = model
    if any(isinstance(m, FeatureBackbone) and m.layer_decay < 1.0 for m in model.modules()):
        params = layer_decay_param_groups(model, cfg.weight_decay)
    optimizer = create_optimizer_v2(
        params, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    total = max(1, steps_per_epoch * epochs)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    if cfg.warmup_epochs > epochs:  # kept for short smoke runs, but not silently: the peak lr comes at the end
        log.warning(
            "optim.warmup_epochs=%g is longer than the run (%d epochs): the warm-up is cut to %d of %d steps",
            cfg.warmup_epochs, epochs, warmup, total,
        )  # fmt: skip
    schedule = CosineLRScheduler(
        optimizer,
        t_initial=max(1, total - warmup),
        lr_min=cfg.lr * cfg.min_lr_factor,
        warmup_t=warmup,
        warmup_lr_init=cfg.lr * cfg.warmup_lr_factor,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    return optimizer, schedule


def layer_decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Param groups keyed by (lr scale, weight decay): backbone parameters scaled by ``layer_lr_scales``,
    everything else (heads, necks, prompt logits) at scale 1; no decay on 1-d tensors and ``no_weight_decay``."""
    scale_of: dict[str, float] = {}
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    for prefix, module in model.named_modules():
        if isinstance(module, FeatureBackbone):
            scale_of.update({f"{prefix}.{n}" if prefix else n: v for n, v in layer_lr_scales(module).items()})
            skip |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim <= 1 or name in skip else weight_decay
        scale = scale_of.get(name, 1.0)
        group = groups.setdefault((scale, decay), {"params": [], "lr_scale": scale, "weight_decay": decay})
        group["params"].append(param)
    return list(groups.values())
