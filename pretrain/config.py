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
from typing import Annotated, Literal

from pipeline.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, PROBABILITY, Check
from pretrain.model_config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig

SHARE = Check(lambda v: 0 < v <= 1, "in (0, 1]")


@dataclass
class DataConfig:
    """Where the images and labels are and how one image becomes a multi-crop sample."""

    root: str = "data"  # data root: ROOT/<corpus>/images and labels
    corpus: str = "synthetic"  # corpus name under root (as given to `clasp ingest --corpus`)
    labelset: str | None = None  # None: the latest completed label set of the corpus
    batch_size: Annotated[int, POSITIVE] = 64  # images per process per micro-batch
    workers: Annotated[int, NON_NEGATIVE] = 8  # DataLoader worker processes per process
    prefetch_factor: Annotated[int, POSITIVE] = 4  # batches each worker prepares ahead
    pin_memory: bool = True  # page-locked host batches (faster copies to the GPU)
    # block of consecutive samples of a reader's span yielded in a seeded order (undecoded)
    shuffle_buffer: Annotated[int, POSITIVE] = 1000
    steps_per_epoch: Annotated[int | None, POSITIVE] = None  # None: one pass over the corpus at the global batch size
    num_global_crops: Annotated[int, POSITIVE] = 2  # large crops (teacher and student see them)
    num_local_crops: Annotated[int, NON_NEGATIVE] = 8  # small crops (student only)
    local_size: Annotated[tuple[int, int] | None, POSITIVE] = None  # None: half the global crop (128x64 for 256x128)
    global_scale: Annotated[tuple[float, float], SHARE] = (0.4, 1.0)  # share of the image area a crop covers
    local_scale: Annotated[tuple[float, float], SHARE] = (0.05, 0.4)  # area share of a local crop
    crop_ratio: Annotated[tuple[float, float] | None, POSITIVE] = None  # width/height range; None: 0.8-1.2x crop aspect
    flip_p: Annotated[float, PROBABILITY] = 0.5  # horizontal flip probability (part maps flip with it)
    photometric: bool = True  # colour jitter, greyscale, blur, solarise (image only)
    part_flip: dict[str, str] = field(default_factory=dict)  # extra left<->right part class pairs
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation (RGB)
    std: tuple[float, float, float] = IMAGENET_STD  # input normalisation (RGB); 0 gives a non-finite loss


@dataclass
class OptimConfig:
    """AdamW with cosine schedules indexed by step (``pretrain.schedules``)."""

    epochs: Annotated[int, AT_LEAST_ONE] = 100  # the schedules span this many passes over the corpus
    lr: Annotated[float, POSITIVE] = 5e-4  # peak learning rate for a global batch of 256 images
    scale_lr_with_batch: bool = True  # lr * global_batch / 256 (DINO's linear scaling rule)
    min_lr: Annotated[float, NON_NEGATIVE] = 1e-6  # end of the cosine
    warmup_epochs: Annotated[float, NON_NEGATIVE] = 10.0  # linear rise to the peak lr
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.04  # at the start; cosine to weight_decay_end
    weight_decay_end: Annotated[float, NON_NEGATIVE] = 0.4  # at the end of the run
    betas: Annotated[tuple[float, float], PROBABILITY] = (0.9, 0.999)  # AdamW moment decay rates
    clip_grad: Annotated[float, NON_NEGATIVE] = 3.0  # max gradient norm (see clip_mode); 0 disables clipping
    # per_param: each parameter tensor's gradient clipped to clip_grad on its own (DINO's and SOLIDER's
    # clip_gradients), so the 65536-wide DINO head does not set the scale of every other gradient;
    # global: one norm over all gradients (torch.nn.utils.clip_grad_norm_), for comparison with other recipes
    clip_mode: Literal["per_param", "global"] = "per_param"
    momentum_teacher: Annotated[float, PROBABILITY] = 0.996  # EMA of the teacher at the start
    momentum_teacher_end: Annotated[float, PROBABILITY] = 1.0  # ... cosine to this at the end

    def config_errors(self, prefix: str) -> list[str]:
        errors = []
        if self.warmup_epochs > self.epochs:  # the run would end before the learning rate reaches its peak
            errors.append(
                f"{prefix}warmup_epochs={self.warmup_epochs:g} is longer than the run ({prefix}epochs={self.epochs}): "
                f"lower {prefix}warmup_epochs"
            )
        if self.min_lr > self.lr:
            errors.append(f"{prefix}min_lr={self.min_lr:g} is above {prefix}lr={self.lr:g}: the cosine would rise")
        return errors


@dataclass
class PretrainConfig:
    """One pre-training run; ``out`` holds config.yaml, checkpoints/, logs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out: str = "runs/pretrain"  # run folder: config.yaml, checkpoints/, logs
    seed: int = 0  # + rank on each process
    # Accelerate's names; a bare `no` in YAML (read as false) is "no" (the config loader normalises it)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    cpu: bool = False  # force the CPU even where a GPU is visible
    grad_accum: Annotated[int, POSITIVE] = 1  # micro-batches per optimizer step
    max_steps: Annotated[int | None, POSITIVE] = None  # stop early (the schedules still span `optim.epochs`)
    # optimizer steps between checkpoints; a resume continues the data stream where it stood
    checkpoint_every: Annotated[int, POSITIVE] = 1000
    keep_last: Annotated[int, POSITIVE] = 3  # step checkpoints kept (older ones are deleted)
    resume: str = "latest"  # "latest" (in out/checkpoints, if any) | "none" | path to a checkpoint
    # settings a resume may change from its checkpoint's (world_size, optim.lr, ...; pretrain/resume.py)
    resume_accept: list[str] = field(default_factory=list)
    log_every: Annotated[int, POSITIVE] = 20  # optimizer steps between log lines
    tensorboard: bool = True  # write out/tb event files
    wandb: bool = False  # log to Weights & Biases too
    wandb_project: str = "clasp"  # W&B project name
    quiet: bool = False  # no progress bar or log lines on the terminal

    def config_errors(self, prefix: str) -> list[str]:
        patch = self.model.patch_size
        if self.data.local_size and any(side % patch for side in self.data.local_size):
            return [
                f"{prefix}data.local_size={list(self.data.local_size)} is not a multiple of "
                f"{prefix}model.patch_size={patch}: pick sides divisible by {patch}"
            ]
        return []
