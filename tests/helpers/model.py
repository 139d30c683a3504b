"""A tiny pre-training model and batches for model-level tests (test_model, test_distill, test_zeroshot)."""

from __future__ import annotations

import torch

from pipeline.config import to_dict
from pretrain.meta_arch import ClaspMetaArch
from pretrain.model_config import LossConfig, ModelConfig, MoEConfig

IMG = (64, 32)  # 4x2 token grid: tiny but not square
NUM_PARTS, NUM_ATTRS = 9, 5


def tiny_cfg(**moe_kwargs: object) -> ModelConfig:
    loss = LossConfig(dino_out_dim=64, dino_hidden_dim=32, dino_bottleneck_dim=16)
    moe = MoEConfig(**{"blocks": "last_half", **moe_kwargs})
    return ModelConfig(arch="vit_micro", img_size=IMG, drop_path=0.0, moe=moe, loss=loss)


def random_batch(batch_size: int = 3, n_local: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    gh, gw = IMG[0] // 16, IMG[1] // 16
    return {
        "global_crops": torch.randn(batch_size, 2, 3, *IMG, generator=g),
        "local_crops": torch.randn(batch_size, n_local, 3, IMG[0] // 2, IMG[1] // 2, generator=g),
        "part_map": torch.randint(-1, NUM_PARTS, (batch_size, 2, gh, gw), generator=g),
        "part_conf": torch.rand(batch_size, 2, gh, gw, generator=g),
        "attr_prob": torch.rand(batch_size, NUM_ATTRS, generator=g),
        "key": [f"k{i}" for i in range(batch_size)],
    }


def checkpoint_dict(model: ClaspMetaArch, cfg: ModelConfig, step: int) -> dict:
    return {"model": model.state_dict(), "config": {"model": to_dict(cfg)}, "step": step}


def distill_cfg(**loss: object) -> ModelConfig:
    """``tiny_cfg`` with the CLIP-embedding distillation term on (and any other loss settings given)."""
    cfg = tiny_cfg()
    cfg.loss.distill = True
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    return cfg
