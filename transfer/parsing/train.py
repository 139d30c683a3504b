"""Human parsing fine-tuning and evaluation on LIP (CE2P / SCHP protocol, as SOLIDER's parsing code).

    clasp transfer parsing --data data/LIP --dataset lip --backbone runs/pretrain/backbone --out runs/parsing-lip
    clasp transfer parsing --data /tmp/synth/LIP --dataset lip --backbone runs/demo/backbones/clasp-s0-ee4998b9 \
        --out runs/parsing-synth --config configs/transfer/parsing_synthetic.yaml
    accelerate launch --num_processes 4 .venv/bin/clasp transfer parsing ... mixed_precision=bf16

Recipe: ViT block maps -> multi-level fuse + progressive upsampling head (``transfer/parsing/model.py``);
pixel-wise cross-entropy, label 255 ignored; CE2P/SCHP augmentation (letterbox into the input, zoom
0.75-1.25, rotation up to +-60 degrees with p 0.6, flip with left/right classes swapped; see
``datasets.py``). Test: letterbox, flip test (the flipped image's logits mirrored back with left/right
channels swapped, averaged with the plain logits), logits mapped back to each label's own resolution,
one confusion matrix over the val set -> mIoU / pixel accuracy / mean accuracy over LIP's 20 classes
(``transfer/parsing/metrics.py``). The defaults are a ViT fine-tuning recipe (AdamW) at CE2P's 473x473, not
tuned on real LIP. ``eval.scales`` gives SCHP's multi-scale test (the LIP paper row,
configs/transfer/parsing_lip.yaml). No edge branch, Lovasz loss or self-correction (SCHP's extras). The run resumes from
``out/checkpoint.pt`` after an interruption.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import AT_LEAST_ONE, POSITIVE
from transfer.backbone import BackboneConfig, build_backbone, part_prompt_backbone
from transfer.data import BatchConfig
from transfer.loop import FineTuneResult, LossFn, Training, prepare_training
from transfer.optim import OptimConfig
from transfer.parsing.datasets import (
    IGNORE_INDEX,
    ParsingAugment,
    ParsingData,
    ParsingDataset,
    flip_permutation,
    load_parsing_dataset,
    logits_to_original,
    read_label,
)
from transfer.parsing.metrics import confusion_matrix, parsing_scores
from transfer.parsing.model import ParsingModel
from transfer.results import pct, save_final_model, write_results
from transfer.task import FineTuneConfig, FineTuneTask

PROTOCOL = (
    "CE2P/SCHP: letterboxed input, logits mapped back to each label's original resolution, one confusion "
    "matrix over the split, 255 ignored; mIoU = mean IoU over all 20 LIP classes (absent classes count 0)"
)


@dataclass
class ParsingDataConfig(BatchConfig):
    input_size: tuple[int, int] = (473, 473)  # (height, width); CE2P/SCHP. Padded inside the model to /16
    batch_size: Annotated[int, POSITIVE] = 16
    augment: ParsingAugment = field(default_factory=ParsingAugment)
    train_split: str = "train"
    eval_split: str = "val"


@dataclass
class ParsingHeadConfig:
    levels: list[int] = field(default_factory=list)  # backbone block indices; [] = 4 evenly spaced, last included
    dim: int = 256


@dataclass
class ParsingEvalConfig:
    flip: bool = True
    # Multi-scale test (SCHP / SOLIDER: 0.5, 0.75, 1.0, 1.25, 1.5): the input resized by each factor, its
    # (flip-averaged) logits resized back to the input and averaged over the scales. [1.0] = single scale.
    scales: list[float] = field(default_factory=lambda: [1.0])
    batch_size: int = 16


@dataclass
class ParsingConfig(FineTuneConfig):
    dataset: str = "lip"
    backbone: BackboneConfig = field(default_factory=part_prompt_backbone)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(name="adamw", lr=2e-4, weight_decay=0.05, warmup_epochs=2.0)
    )
    epochs: Annotated[int, AT_LEAST_ONE] = 50
    data: ParsingDataConfig = field(default_factory=ParsingDataConfig)
    head: ParsingHeadConfig = field(default_factory=ParsingHeadConfig)
    eval: ParsingEvalConfig = field(default_factory=ParsingEvalConfig)


CONFIG = ParsingConfig


def _padded(size: tuple[int, int], patch: int = 16) -> tuple[int, int]:
    return (size[0] + (-size[0]) % patch, size[1] + (-size[1]) % patch)


class ParsingTask(FineTuneTask[ParsingConfig, ParsingData]):
    name = "parsing"
    config = ParsingConfig
    data_hint = "the LIP folder"

    def load_data(self, cfg: ParsingConfig) -> ParsingData:
        return load_parsing_dataset(cfg.dataset, cfg.data_dir)

    def build_model(self, cfg: ParsingConfig, data: ParsingData) -> ParsingModel:
        backbone = build_backbone(cfg.backbone, _padded(tuple(cfg.data.input_size)))
        if list(cfg.eval.scales) != [1.0]:
            backbone.allow_any_input_size()  # the multi-scale test feeds other sizes
        return ParsingModel(backbone, len(data.classes), levels=cfg.head.levels, dim=cfg.head.dim)

    def prepare(self, cfg: ParsingConfig, data: ParsingData, model: ParsingModel, accelerator: Any) -> Training:
        bb, input_size = model.backbone, tuple(cfg.data.input_size)
        items = data.split(cfg.data.train_split)
        train_set = ParsingDataset(items, input_size, bb.mean, bb.std, cfg.data.augment, seed=cfg.seed)
        return prepare_training(accelerator, cfg, cfg.data, model, train_set, seed=cfg.seed, quiet=cfg.quiet)

    def loss_fn(self, cfg: ParsingConfig, data: ParsingData, accelerator: Any) -> LossFn:
        def loss_fn(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": F.cross_entropy(net(images).float(), labels, ignore_index=IGNORE_INDEX)}

        return loss_fn

    def evaluate(self, cfg: ParsingConfig, data: ParsingData, model: ParsingModel, accelerator: Any) -> np.ndarray:
        return evaluate(model, data, cfg, accelerator)

    def write(
        self, out: Path, cfg: ParsingConfig, data: ParsingData, model: ParsingModel, scores: Any,
        training: FineTuneResult,
    ) -> dict[str, Any]:  # fmt: skip
        return _write(out, cfg, data, model, scores, training)


run = ParsingTask().run


@torch.no_grad()
def predict_logits(
    model: ParsingModel, images: torch.Tensor, *, flip: bool, scales: tuple[float, ...] = (1.0,)
) -> torch.Tensor:
    """Logits at the input size; with ``flip`` averaged with the mirrored image's (left/right channels swapped);
    with several ``scales`` the mean over the input resized by each (bilinear, logits resized back)."""
    size = images.shape[-2:]
    total = None
    for scale in scales:
        scaled = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear")
        logits = model(scaled).float()
        if flip:
            perm = torch.from_numpy(flip_permutation(logits.shape[1])).to(logits.device)
            mirrored = model(scaled.flip(-1)).float().flip(-1)
            logits = (logits + mirrored[:, perm]) / 2
        if scale != 1.0:
            logits = F.interpolate(logits, size=size, mode="bilinear")
        total = logits if total is None else total + logits
    return total / len(scales)


@torch.no_grad()
def evaluate(model: ParsingModel, data: ParsingData, cfg: ParsingConfig, accelerator: Any) -> np.ndarray:
    """Summed (C, C) confusion matrix of ``cfg.data.eval_split`` at each label's original resolution."""
    items = data.split(cfg.data.eval_split)
    bb = model.backbone
    dataset = ParsingDataset(items, tuple(cfg.data.input_size), bb.mean, bb.std, augment=None)
    mine = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))  # disjoint per rank
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, mine), batch_size=cfg.eval.batch_size, num_workers=cfg.data.workers
    )
    num_classes = len(data.classes)
    conf = np.zeros((num_classes, num_classes), np.int64)
    model.eval()
    for images, meta in loader:
        with accelerator.autocast():
            logits = predict_logits(
                model, images.to(accelerator.device), flip=cfg.eval.flip, scales=tuple(cfg.eval.scales)
            )
        for b in range(images.shape[0]):
            item = items[int(meta["index"][b])]
            height, width = int(meta["height"][b]), int(meta["width"][b])
            pred = logits_to_original(logits[b].float(), meta["matrix"][b], height, width).argmax(0)
            conf += confusion_matrix(read_label(item.label), pred.cpu().numpy(), num_classes, IGNORE_INDEX)
    total = accelerator.reduce(torch.from_numpy(conf).to(accelerator.device), reduction="sum")
    return total.cpu().numpy()


def summarize(conf: np.ndarray, classes: tuple[str, ...]) -> dict[str, Any]:
    """parsing_scores plus the mean IoU over the classes that occur in the ground truth."""
    scores = parsing_scores(conf)
    present = conf.sum(axis=1) > 0
    iou = np.asarray(scores["per_class_iou"])
    return {
        "mIoU": scores["mIoU"],
        "pixel_acc": scores["pixel_acc"],
        "mean_acc": scores["mean_acc"],
        "mIoU_present_classes": float(iou[present].mean()),
        "present_classes": int(present.sum()),
        "per_class_iou": {name: float(v) for name, v in zip(classes, iou, strict=True)},
        "gt_pixels": {name: int(v) for name, v in zip(classes, conf.sum(axis=1), strict=True)},
    }


def _write(
    out: Path, cfg: ParsingConfig, data: ParsingData, model: ParsingModel, conf: np.ndarray, training: FineTuneResult
) -> dict[str, Any]:
    metrics = summarize(conf, data.classes)
    h, w = cfg.data.input_size
    protocol = (
        f"{PROTOCOL}; split {cfg.data.eval_split}; input {h}x{w}; "
        f"{'flip test with left/right swap' if cfg.eval.flip else 'no flip test'}"
        + (f"; multi-scale test {list(cfg.eval.scales)}" if list(cfg.eval.scales) != [1.0] else "")
    )
    absent = [n for n, px in metrics["gt_pixels"].items() if px == 0]
    table = [
        ("mIoU (all 20 classes)", pct(metrics["mIoU"])),
        (f"mIoU over the {metrics['present_classes']} classes present in the ground truth",
         pct(metrics["mIoU_present_classes"])),
        ("pixel accuracy", pct(metrics["pixel_acc"])),
        ("mean accuracy", pct(metrics["mean_acc"])),
    ]  # fmt: skip
    table += [
        (f"IoU {name}{' (absent from ground truth)' if name in absent else ''}", pct(iou))
        for name, iou in metrics["per_class_iou"].items()
    ]
    record = {
        "task": "parsing",
        "dataset": data.name,
        "layout": data.layout,
        "protocol": protocol,
        "backbone": model.backbone.provenance(),
        "prompt": model.backbone.describe_prompt(),
        "head": f"multi-level fuse of blocks {model.levels} + progressive upsampling to stride 4, dim {cfg.head.dim}",
        "metrics": {k: metrics[k] for k in ("mIoU", "mIoU_present_classes", "pixel_acc", "mean_acc")},
        "per_class_iou": metrics["per_class_iou"],
        "classes_absent_from_ground_truth": absent,
        "confusion_matrix": conf.tolist(),
        "data": data.summary(),
        "training": training.record(cfg.epochs),
        "history": training.history,
    }
    save_final_model(out, model)
    return write_results(out, cfg, record, title=f"Human parsing transfer: {data.name}", table=table)
