"""Settings of ``clasp pretrain``: data stream, model, optimisation schedule, run bookkeeping.

Defaults -> ``configs/pretrain/*.yaml`` -> dotted overrides (``optim.lr=1e-4``), via
``pipeline.config.load_config``. The resolved config is written to ``<out>/config.yaml`` and into
every checkpoint.

The optimisation defaults follow DINO as SOLIDER runs it on LUPerson (``run_dino.sh`` /
``main_dino.py`` of tinyvision/SOLIDER): 100 epochs, AdamW, lr 5e-4 per 256 images scaled
linearly with the global batch, 10 warm-up epochs, cosine to 1e-6, weight decay 0.04 -> 0.4,
gradient clipping at 3.0, teacher momentum 0.996 -> 1, person-aspect crops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pretrain.model_config import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """Where the images and labels are and how one image becomes a multi-crop sample."""

    root: str = "data"
    corpus: str = "synthetic"
    labelset: str | None = None  # None: the latest completed label set of the corpus
    batch_size: int = 64  # images per process per micro-batch
    workers: int = 8  # DataLoader worker processes per process
    prefetch_factor: int = 4
    pin_memory: bool = True
    shuffle_buffer: int = 1000  # block of consecutive samples of a reader's span yielded in a seeded order (undecoded)
    steps_per_epoch: int | None = None  # None: one pass over the corpus at the global batch size
    num_global_crops: int = 2
    num_local_crops: int = 8
    local_size: tuple[int, int] | None = None  # None: half the global crop (128x64 for 256x128)
    global_scale: tuple[float, float] = (0.4, 1.0)  # share of the image area a crop covers
    local_scale: tuple[float, float] = (0.05, 0.4)
    crop_ratio: tuple[float, float] | None = None  # width/height range; None: 0.8-1.2x the crop aspect
    flip_p: float = 0.5
    photometric: bool = True  # colour jitter, greyscale, blur, solarise (image only)
    part_flip: dict[str, str] = field(default_factory=dict)  # extra left<->right part class pairs
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class OptimConfig:
    """AdamW with cosine schedules indexed by step (``pretrain.schedules``)."""

    epochs: int = 100
    lr: float = 5e-4  # peak learning rate for a global batch of 256 images
    scale_lr_with_batch: bool = True  # lr * global_batch / 256 (DINO's linear scaling rule)
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0  # max gradient norm; 0 disables clipping
    # per_param: each parameter tensor's gradient clipped to clip_grad on its own (DINO's and SOLIDER's
    # clip_gradients), so the 65536-wide DINO head does not set the scale of every other gradient;
    # global: one norm over all gradients (torch.nn.utils.clip_grad_norm_), for comparison with other recipes
    clip_mode: Literal["per_param", "global"] = "per_param"
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0


@dataclass
class PretrainConfig:
    """One pre-training run; ``out`` holds config.yaml, checkpoints/, logs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out: str = "runs/pretrain"
    seed: int = 0
    # "no" | "bf16" | "fp16" (Accelerate's names); YAML reads a bare `no` as false, which means "no" too
    mixed_precision: Literal["no", "bf16", "fp16"] | bool = "no"
    cpu: bool = False  # force the CPU even where a GPU is visible
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None  # stop early (the schedules still span `optim.epochs`)
    checkpoint_every: int = 1000  # optimizer steps; a resume continues the data stream where it stood
    keep_last: int = 3  # step checkpoints kept (older ones are deleted)
    resume: str = "latest"  # "latest" (in out/checkpoints, if any) | "none" | path to a checkpoint
    # settings a resume may change from its checkpoint's (world_size, optim.lr, ...; pretrain/resume.py)
    resume_accept: list[str] = field(default_factory=list)
    log_every: int = 20
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "clasp"
    quiet: bool = False
