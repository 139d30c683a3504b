"""Frozen-feature read-outs: what a backbone's pooled features hold, with no gradient step anywhere.

    clasp transfer frozen --data data/Market-1501-v15.09.15 --dataset market1501 --backbone runs/export/vit_s --out o
    clasp transfer frozen --data data/PA100k --dataset pa100k --backbone random:vit_micro --out o
    clasp transfer frozen --data data/PA100k --dataset pa100k --backbone pixels:16x8 --out o   # raw-pixel floor

The standard self-supervised check, costing seconds: no read-out training means no read-out noise
(learning rate, epochs, seed) between two backbones.

- **re-ID** (Market-1501-style layouts, MSMT17): pooled features of query and gallery, L2-normalised,
  ranked by distance under the Market-1501 protocol (``transfer.reid.metrics``); mAP, rank-1, mINP.
- **attributes** (PA-100K, PETA, RAP): per attribute a class-balanced ridge regression of the 0/1 label
  on the standardised features (closed form; positives and negatives weigh half each, so an uninformative
  feature scores 50 mA, not the prior's), ridge strength chosen by mA on ``val`` (fit on ``train``), then
  refit on train + val and scored on ``test`` with label-based mA (``transfer.attributes.metrics``,
  Rethinking_of_PAR's definition) at the score threshold 0.5.

``--backbone pixels:HxW`` reads the images downsampled to H x W (RGB, ImageNet-normalised) as the
feature vector: the floor every pre-trained backbone must clear. Any other spec is a
``transfer.backbone`` spec, read in eval mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from pipeline.errors import ClaspError
from transfer.backbone import IMAGENET_MEAN, IMAGENET_STD, BackboneConfig, build_backbone
from transfer.data import ImageDataset
from transfer.loop import seed_everything
from transfer.results import finished_results, pct, write_results
from transfer.task import TaskConfig, start

RETRIEVAL_PROTOCOL = (
    "frozen backbone, pooled features L2-normalised, no training; Market-1501 protocol (torchreid eval_market1501: "
    "same-id same-camera gallery removed), no re-ranking"
)
RIDGE_PROTOCOL = (
    "frozen backbone, pooled features standardised; class-balanced ridge regression per attribute (closed form, "
    "strength chosen by mA on val, refit on train+val), score > 0.5; label-based mA as Rethinking_of_PAR"
)


@dataclass
class FrozenConfig(TaskConfig):
    dataset: str = "market1501"  # a re-ID (market1501, msmt17, ...) or attribute (pa100k, peta, rap, ...) dataset
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(freeze=True, drop_path_rate=0.0))
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"  # autocast of the backbone on cuda (never on cpu)
    img_size: tuple[int, int] = (256, 128)  # (height, width) fed to the backbone; ignored by pixels:HxW
    batch_size: int = 64
    workers: int = 2
    ridge_strengths: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0])


CONFIG = FrozenConfig


def pixel_size(spec: str) -> tuple[int, int] | None:
    """(H, W) of a ``pixels:HxW`` spec, None for any other backbone spec."""
    if not spec.startswith("pixels:"):
        return None
    try:
        h, w = (int(v) for v in spec[len("pixels:") :].lower().split("x"))
    except ValueError:
        raise ClaspError(f"backbone spec '{spec}': write pixels:HxW, e.g. pixels:16x8") from None
    if h < 1 or w < 1:
        raise ClaspError(f"backbone spec '{spec}': H and W must be >= 1")
    return h, w


class FeatureExtractor:
    """``extract(paths) -> (N, D) float32`` pooled features of a frozen backbone, or downsampled pixels."""

    def __init__(self, cfg: FrozenConfig) -> None:
        import torchvision.transforms as T

        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if cfg.device == "auto" else cfg.device))  # fmt: skip
        pixels = pixel_size(cfg.backbone.spec)
        if pixels is not None:
            self.model, mean, std, size = None, IMAGENET_MEAN, IMAGENET_STD, pixels
            self.source = f"raw pixels {pixels[0]}x{pixels[1]}"
        else:
            backbone_cfg = BackboneConfig(**{**vars(cfg.backbone), "freeze": True})
            self.model = build_backbone(backbone_cfg, tuple(cfg.img_size)).to(self.device).eval()
            mean, std, size = self.model.mean, self.model.std, tuple(cfg.img_size)
            self.source = self.model.source
        self.transform = T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(mean, std)])
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        self.autocast_dtype = dtypes.get(cfg.mixed_precision) if self.device.type == "cuda" else None

    @torch.no_grad()
    def extract(self, paths: list[str]) -> np.ndarray:
        dataset = ImageDataset(paths, [0] * len(paths), self.transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.cfg.batch_size, num_workers=self.cfg.workers)
        chunks = []
        for images, _, _ in loader:
            if self.model is None:
                chunks.append(images.flatten(1))
                continue
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                chunks.append(self.model(images.to(self.device)).float().cpu())
        return torch.cat(chunks).numpy().astype(np.float32)


def retrieval(extract: FeatureExtractor, data_dir: str, dataset: str) -> dict[str, Any]:
    """Market-1501-protocol mAP / CMC / mINP of the frozen features (nothing is trained)."""
    from transfer.reid.datasets import load_reid_dataset
    from transfer.reid.metrics import evaluate_rank, pairwise_distance

    data = load_reid_dataset(dataset, data_dir)
    query, gallery = extract.extract([p for p, _, _ in data.query]), extract.extract([p for p, _, _ in data.gallery])
    ranks = evaluate_rank(
        pairwise_distance(query, gallery, normalize=True),
        [pid for _, pid, _ in data.query],
        [pid for _, pid, _ in data.gallery],
        [cam for _, _, cam in data.query],
        [cam for _, _, cam in data.gallery],
    )
    metrics = {"mAP": ranks["mAP"], "rank1": float(ranks["cmc"][0]), "mINP": ranks["mINP"]}
    metrics["rank5"] = float(ranks["cmc"][min(4, len(ranks["cmc"]) - 1)])
    return {"metrics": metrics, "layout": data.layout, "protocol": RETRIEVAL_PROTOCOL, "sizes": data.summary()}


def balanced_ridge(features: np.ndarray, labels: np.ndarray, strength: float) -> np.ndarray:
    """(D + 1, A) weights (bias last) of a class-balanced ridge regression per attribute; bias not penalised.

    Positives and negatives of each attribute carry half the total weight each, so the fitted score of an
    uninformative feature sits at 0.5 between the classes instead of at the positive rate.
    """
    x = np.concatenate([features, np.ones((len(features), 1), features.dtype)], axis=1).astype(np.float64)
    y = (labels == 1).astype(np.float64)
    penalty = np.eye(x.shape[1]) * strength
    penalty[-1, -1] = 0.0
    weights = np.zeros((x.shape[1], y.shape[1]))
    for a in range(y.shape[1]):
        pos = y[:, a].mean()
        if pos in (0.0, 1.0):  # one class only: a constant score on that side of 0.5
            weights[-1, a] = 0.75 if pos == 1.0 else 0.25
            continue
        w = np.where(y[:, a] == 1, 0.5 / pos, 0.5 / (1 - pos))
        xw = x * w[:, None]
        weights[:, a] = np.linalg.solve(x.T @ xw + penalty, xw.T @ y[:, a])
    return weights


def _score(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.concatenate([features, np.ones((len(features), 1), features.dtype)], axis=1) @ weights


def ridge_readout(extract: FeatureExtractor, data_dir: str, dataset: str, strengths: list[float]) -> dict[str, Any]:
    """Label-based mA of a closed-form class-balanced ridge read-out (strength chosen on val, scored on test)."""
    from transfer.attributes.datasets import load_attr_dataset
    from transfer.attributes.metrics import attribute_metrics

    data = load_attr_dataset(dataset, data_dir)
    for split in ("train", "val", "test"):
        if split not in data.splits:
            raise ClaspError(f"{data_dir}: the frozen attribute read-out needs train, val and test splits ({split})")
    feats = {s: extract.extract(data.split(s)[0]) for s in ("train", "val", "test")}
    labels = {s: data.split(s)[1] for s in ("train", "val", "test")}

    def standardise(fit: np.ndarray, *rest: np.ndarray) -> list[np.ndarray]:
        mean, std = fit.mean(0), fit.std(0) + 1e-6
        return [(a - mean) / std for a in (fit, *rest)]

    train, val = standardise(feats["train"], feats["val"])
    scan = {}
    for strength in strengths:
        scan[strength] = attribute_metrics(labels["val"], _score(val, balanced_ridge(train, labels["train"], strength)))
    best = max(strengths, key=lambda s: scan[s]["mA"])
    trainval, test = standardise(np.concatenate([feats["train"], feats["val"]]), feats["test"])
    weights = balanced_ridge(trainval, np.concatenate([labels["train"], labels["val"]]), best)
    result = attribute_metrics(labels["test"], _score(test, weights))
    metrics = {k: result[k] for k in ("mA", "accuracy", "precision", "recall", "f1")}
    return {
        "metrics": metrics,
        "ridge_strength": best,
        "val_mA": {str(s): scan[s]["mA"] for s in strengths},
        "layout": data.layout,
        "protocol": RIDGE_PROTOCOL,
        "sizes": data.summary(),
    }


class FrozenTask:
    """No training: retrieval mAP or a closed-form attribute read-out of frozen features."""

    name = "frozen"
    config = FrozenConfig
    data_hint = "dataset folder"
    datasets = ()  # checked in run: any re-ID or attribute dataset

    def run(self, cfg: FrozenConfig) -> dict[str, Any]:
        """Evaluate the frozen backbone on ``cfg.dataset``; writes results.json / results.md to ``cfg.out_dir``."""
        from transfer.attributes.datasets import ATTR_DATASETS
        from transfer.reid.datasets import REID_DATASETS

        out = start(self, cfg)
        key = cfg.dataset.lower().replace("-", "_")
        if key not in REID_DATASETS and key not in ATTR_DATASETS:
            raise ClaspError(
                f"transfer frozen: unknown dataset '{cfg.dataset}': choose a re-ID ({', '.join(REID_DATASETS)}) "
                f"or attribute dataset ({', '.join(ATTR_DATASETS)})"
            )
        finished = finished_results(out, cfg)
        if finished is not None:
            return finished
        out.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        t0 = time.perf_counter()
        extract = FeatureExtractor(cfg)
        if key in REID_DATASETS:
            record = retrieval(extract, cfg.data_dir, cfg.dataset)
            headline = "mAP"
        else:
            record = ridge_readout(extract, cfg.data_dir, cfg.dataset, cfg.ridge_strengths)
            headline = "mA"
        record = {**record, headline: record["metrics"][headline], "backbone": extract.source}
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        table = [(name, pct(value)) for name, value in record["metrics"].items()]
        record = write_results(out, cfg, record, title=f"Frozen-feature read-out: {cfg.dataset}", table=table)
        if not cfg.quiet:
            print(f"frozen {cfg.dataset}: {headline} {pct(record[headline])} ({extract.source}, {record['wall_s']} s)")
        return record


run = FrozenTask().run
