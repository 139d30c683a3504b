"""Pedestrian attribute fine-tuning and evaluation (Rethinking_of_PAR's strong baseline protocol).

    clasp transfer attributes --data data/PA100k --dataset pa100k --backbone runs/demo/backbone --out runs/pa100k
    clasp transfer attributes --data data/PETA --dataset peta_zs --backbone ... --out runs/peta_zs

Recipe: pooled backbone feature -> linear classifier (one logit per evaluated attribute); binary
cross-entropy weighted per attribute by the training positive ratio r (exp(1 - r) on positives,
exp(r) on negatives; Li et al. TIP 2020, as Rethinking_of_PAR's ``bceloss`` with
``SAMPLE_WEIGHT: weight``), summed over attributes and averaged over images; resize to 256x192,
10 px pad + crop, random flip; train on ``trainval``, evaluate the final model on ``test`` with
``attribute_metrics`` (no model selection on the test set). Resumes from ``out/checkpoint.pt``.
The paper rows (``configs/transfer/attributes_{pa100k,peta_zs,rap_zs}.yaml``) follow SOLIDER's settings:
Adam lr 1e-5, batch 64, gradient clipping at 10.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import AT_LEAST_ONE, POSITIVE
from transfer.attributes import metrics as attr_metrics
from transfer.attributes.datasets import AttrData, load_attr_dataset
from transfer.backbone import BackboneConfig, FeatureBackbone, build_backbone
from transfer.data import BatchConfig, ImageDataset
from transfer.loop import FineTuneResult, LossFn, Training, predict_in_order, prepare_training
from transfer.optim import OptimConfig
from transfer.results import pct, save_final_model, write_results
from transfer.task import FineTuneConfig, FineTuneTask


@dataclass
class AttrDataConfig(BatchConfig):
    img_size: Annotated[tuple[int, int], POSITIVE] = (256, 192)  # (height, width), Rethinking_of_PAR; SOLIDER: 256x128
    flip_prob: float = 0.5
    padding_px: int = 10
    train_split: str = "trainval"
    test_split: str = "test"
    pickle_file: str = ""  # PETA/RAP: another Rethinking_of_PAR pickle, e.g. dataset_zs_run1.pkl
    partition: int = 0  # which of the 5 random partitions of PETA/RAP dataset_all.pkl


@dataclass
class AttrConfig(FineTuneConfig):
    dataset: str = "pa100k"
    backbone: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(prompt="learned", prompt_mix={"attribute": 0.8, "instance": 0.2})
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(name="adamw", lr=1e-4, weight_decay=5e-4, warmup_epochs=1.0)
    )
    epochs: Annotated[int, AT_LEAST_ONE] = 30
    data: AttrDataConfig = field(default_factory=AttrDataConfig)
    weighted_loss: bool = True
    threshold: float = 0.5


CONFIG = AttrConfig


class AttrModel(nn.Module):
    def __init__(self, backbone: FeatureBackbone, num_attributes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.num_features, num_attributes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images))

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, pos_ratio: torch.Tensor | None) -> torch.Tensor:
    """BCE summed over attributes, mean over images; positives weighted exp(1 - r), negatives exp(r)."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    if pos_ratio is not None:
        weight = torch.exp(targets * (1 - pos_ratio) + (1 - targets) * pos_ratio)
        loss = loss * weight
    return loss.sum(dim=1).mean()


def transforms(backbone: FeatureBackbone, cfg: AttrDataConfig, *, train: bool) -> Any:
    import torchvision.transforms as T

    size = tuple(cfg.img_size)
    ops: list[Any] = [T.Resize(size)]
    if train:
        ops += [T.Pad(cfg.padding_px), T.RandomCrop(size), T.RandomHorizontalFlip(cfg.flip_prob)]
    ops += [T.ToTensor(), T.Normalize(backbone.mean, backbone.std)]
    return T.Compose(ops)


class AttrTask(FineTuneTask[AttrConfig, AttrData]):
    name = "attributes"
    config = AttrConfig

    def load_data(self, cfg: AttrConfig) -> AttrData:
        return load_attr_dataset(
            cfg.dataset, cfg.data_dir, pickle_file=cfg.data.pickle_file, partition=cfg.data.partition
        )

    def build_model(self, cfg: AttrConfig, data: AttrData) -> AttrModel:
        return AttrModel(build_backbone(cfg.backbone, tuple(cfg.data.img_size)), len(data.attr_names))

    def prepare(self, cfg: AttrConfig, data: AttrData, model: AttrModel, accelerator: Any) -> Training:
        paths, labels = data.split(cfg.data.train_split)
        transform = transforms(model.backbone, cfg.data, train=True)
        train_set = ImageDataset(paths, list(labels.astype(np.float32)), transform)
        return prepare_training(accelerator, cfg, cfg.data, model, train_set, seed=cfg.seed, quiet=cfg.quiet)

    def loss_fn(self, cfg: AttrConfig, data: AttrData, accelerator: Any) -> LossFn:
        targets = data.split(cfg.data.train_split)[1].astype(np.float32)
        pos_ratio = torch.from_numpy(targets.mean(axis=0)).to(accelerator.device) if cfg.weighted_loss else None

        def loss_fn(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": weighted_bce(net(images), labels.float(), pos_ratio)}

        return loss_fn

    def evaluate(self, cfg: AttrConfig, data: AttrData, model: AttrModel, accelerator: Any) -> dict[str, Any]:
        gt, probs = predict(model, data, cfg, accelerator)
        return attr_metrics.attribute_metrics(gt, probs, threshold=cfg.threshold)

    def write(
        self, out: Path, cfg: AttrConfig, data: AttrData, model: AttrModel, scores: Any, training: FineTuneResult
    ) -> dict[str, Any]:
        return _write(out, cfg, data, model, scores, training)


run = AttrTask().run


def predict(model: AttrModel, data: AttrData, cfg: AttrConfig, accelerator: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth, sigmoid probabilities) on the test split, in dataset order."""
    paths, labels = data.split(cfg.data.test_split)
    dataset = ImageDataset(paths, list(range(len(paths))), transforms(model.backbone, cfg.data, train=False))
    model.eval()
    probs = predict_in_order(
        accelerator,
        lambda x: torch.sigmoid(model(x).float()),
        dataset,
        batch_size=cfg.data.batch_size,
        workers=cfg.data.workers,
    )
    return labels, probs.numpy()


def _write(
    out: Path, cfg: AttrConfig, data: AttrData, model: AttrModel, scores: dict[str, Any], training: FineTuneResult
) -> dict[str, Any]:
    h, w = cfg.data.img_size
    protocol = (
        f"{attr_metrics.PROTOCOL.replace('threshold 0.5', f'threshold {cfg.threshold}')}; "
        f"trained on '{cfg.data.train_split}', final-epoch model evaluated on '{cfg.data.test_split}' (no model "
        "selection on the test split; Rethinking_of_PAR / SOLIDER report their best test epoch, which does); "
        f"input {h}x{w}"
    )
    summary = {k: float(scores[k]) for k in ("mA", "accuracy", "precision", "recall", "f1")}
    per_attribute = {
        name: {"mA": float(ma), "pos_recall": float(p), "neg_recall": float(n)}
        for name, ma, p, n in zip(
            data.attr_names, scores["label_mA"], scores["label_pos_recall"], scores["label_neg_recall"], strict=True
        )
    }
    record = {
        "task": "attributes",
        "dataset": data.name,
        "layout": data.layout,
        "protocol": protocol,
        "backbone": model.backbone.provenance(),
        "prompt": model.backbone.describe_prompt(),
        "metrics": summary,
        "per_attribute": per_attribute,
        "data": data.summary(),
        "training": training.record(cfg.epochs),
        "history": training.history,
    }
    labels = (("mA", "mA"), ("Acc", "accuracy"), ("Prec", "precision"), ("Rec", "recall"), ("F1", "f1"))
    save_final_model(out, model)
    return write_results(
        out, cfg, record, title=f"Attribute transfer: {data.name}", table=[(n, pct(summary[k])) for n, k in labels]
    )
