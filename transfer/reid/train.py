"""Re-ID fine-tuning and evaluation (strong-baseline / TransReID recipe, SOLIDER's downstream protocol).

    clasp transfer reid --data data/Market-1501-v15.09.15 --dataset market1501 --backbone runs/demo/backbone \
        --out runs/reid-market
    clasp transfer reid --data data/msmt17 --dataset msmt17 --backbone runs/pretrain/backbone --out runs/msmt17 \
        mixed_precision=bf16 data.workers=16
    accelerate launch --num_processes 4 .venv/bin/clasp transfer reid ...      # several GPUs

Recipe: BNNeck head; identity cross-entropy (label smoothing 0.1) on the BN feature + batch-hard
triplet (margin 0.3, or soft margin with ``loss.triplet_margin=null``) on the pooled feature; P x K
batches (16 x 4); random flip, 10 px pad + crop, random erasing; SGD with linear warmup + cosine.
Test: BN feature, L2-normalised, squared Euclidean distance, Market-1501 protocol; optional
k-reciprocal re-ranking. The run resumes from ``out/checkpoint.pt`` after an interruption.
The code defaults are TransReID's ImageNet-ViT recipe; the LUPerson ViT-B paper rows (TransReID-SSL: 384x128,
SGD 4e-4, 20 warm-up epochs, no label smoothing, soft margin, before-BN feature, global batch 64) are
``configs/transfer/reid_{market1501,msmt17}.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from pipeline.config import AT_LEAST_ONE, POSITIVE
from transfer.backbone import BackboneConfig, build_backbone
from transfer.data import ImageDataset
from transfer.loop import FineTuneResult, LossFn, Training, predict_in_order
from transfer.reid import metrics as reid_metrics
from transfer.reid.datasets import ReidData, load_reid_dataset
from transfer.reid.identity import (
    IdentityBatchConfig,
    ReidLossConfig,
    id_triplet_loss,
    identities_per_process,
    identity_training,
    transforms,
)
from transfer.reid.model import ReidModel
from transfer.reid.rerank import k_reciprocal_rerank
from transfer.results import pct, save_final_model, write_results
from transfer.task import FineTuneConfig, FineTuneTask


@dataclass
class ReidDataConfig(IdentityBatchConfig):
    workers: int = 8
    msmt17_with_val: bool = True  # MSMT17: train on list_train + list_val (TransReID / SOLIDER)


@dataclass
class ReidEvalConfig:
    feature: Literal["after_bn", "before_bn"] = "after_bn"
    normalize: bool = True
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    max_rank: int = 50
    batch_size: Annotated[int, POSITIVE] = 128


@dataclass
class ReidConfig(FineTuneConfig):
    dataset: str = "market1501"
    backbone: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(prompt="learned", prompt_mix={"instance": 0.8, "attribute": 0.2})
    )
    epochs: Annotated[int, AT_LEAST_ONE] = 120
    data: ReidDataConfig = field(default_factory=ReidDataConfig)
    loss: ReidLossConfig = field(default_factory=ReidLossConfig)
    eval: ReidEvalConfig = field(default_factory=ReidEvalConfig)


CONFIG = ReidConfig


def identities_per_batch(cfg: ReidConfig, accelerator: Any) -> int:
    """P of the per-process P x K batch (``data.global_batch`` split over the processes, else
    ``data.p_identities``); the global batch is printed on the main process."""
    return identities_per_process(cfg.data, accelerator, key="data.global_batch", quiet=cfg.quiet)


class ReidTask(FineTuneTask[ReidConfig, ReidData]):
    name = "reid"
    config = ReidConfig

    def load_data(self, cfg: ReidConfig) -> ReidData:
        return load_reid_dataset(cfg.dataset, cfg.data_dir, msmt17_with_val=cfg.data.msmt17_with_val)

    def build_model(self, cfg: ReidConfig, data: ReidData) -> ReidModel:
        return ReidModel(build_backbone(cfg.backbone, tuple(cfg.data.img_size)), data.num_train_ids)

    def prepare(self, cfg: ReidConfig, data: ReidData, model: ReidModel, accelerator: Any) -> Training:
        pids = [pid for _, pid, _ in data.train]
        identities = identities_per_batch(cfg, accelerator)
        train_set = ImageDataset([p for p, _, _ in data.train], pids, transforms(model.backbone, cfg.data, train=True))
        return identity_training(
            accelerator, cfg, model, train_set, pids, identities=identities, k_instances=cfg.data.k_instances,
            workers=cfg.data.workers, seed=cfg.seed,
        )  # fmt: skip

    def loss_fn(self, cfg: ReidConfig, data: ReidData, accelerator: Any) -> LossFn:
        return id_triplet_loss(cfg.loss)

    def evaluate(self, cfg: ReidConfig, data: ReidData, model: ReidModel, accelerator: Any) -> dict[str, Any]:
        return evaluate(model, data, cfg, accelerator)

    def write(
        self, out: Path, cfg: ReidConfig, data: ReidData, model: ReidModel, scores: Any, training: FineTuneResult
    ) -> dict[str, Any]:
        return _write(out, cfg, data, model, scores, training)


run = ReidTask().run


def extract_features(model: ReidModel, items: list, cfg: ReidConfig, accelerator: Any) -> np.ndarray:
    """Test features (BN or pre-BN, per ``cfg.eval.feature``) for ``items`` in their order."""
    dataset = ImageDataset(
        [p for p, _, _ in items], [0] * len(items), transforms(model.backbone, cfg.data, train=False)
    )
    pick = 1 if cfg.eval.feature == "after_bn" else 0
    model.eval()
    feats = predict_in_order(
        accelerator, lambda x: model(x)[pick], dataset, batch_size=cfg.eval.batch_size, workers=cfg.data.workers
    )
    return feats.numpy()


def evaluate(model: ReidModel, data: ReidData, cfg: ReidConfig, accelerator: Any) -> dict[str, Any]:
    """Market-protocol CMC/mAP/mINP (and re-ranked ones when ``eval.rerank``) on query vs gallery."""
    q = extract_features(model, data.query, cfg, accelerator)
    g = extract_features(model, data.gallery, cfg, accelerator)
    q_pids, q_cams = (np.array([it[i] for it in data.query]) for i in (1, 2))
    g_pids, g_cams = (np.array([it[i] for it in data.gallery]) for i in (1, 2))
    dist = reid_metrics.pairwise_distance(q, g, normalize=cfg.eval.normalize)
    scores = {"plain": reid_metrics.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=cfg.eval.max_rank)}
    if cfg.eval.rerank:
        if cfg.eval.normalize:
            q, g = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) for x in (q, g))
        rr = k_reciprocal_rerank(q, g, k1=cfg.eval.k1, k2=cfg.eval.k2, lambda_value=cfg.eval.lambda_value)
        scores["reranked"] = reid_metrics.evaluate_rank(rr, q_pids, g_pids, q_cams, g_cams, max_rank=cfg.eval.max_rank)
    return scores


def _summary(result: dict[str, Any]) -> dict[str, float]:
    cmc = result["cmc"]
    out = {"mAP": result["mAP"], "mINP": result["mINP"]}
    for k in (1, 5, 10):
        if k <= len(cmc):
            out[f"rank{k}"] = float(cmc[k - 1])
    out["valid_queries"] = result["num_valid_queries"]
    return out


def _write(
    out: Path, cfg: ReidConfig, data: ReidData, model: ReidModel, scores: dict[str, Any], training: FineTuneResult
) -> dict[str, Any]:
    h, w = cfg.data.img_size
    protocol = (
        f"{reid_metrics.PROTOCOL}; test feature {cfg.eval.feature.replace('_', ' ')} of BNNeck, "
        f"{'L2-normalised, ' if cfg.eval.normalize else ''}squared Euclidean; input {h}x{w}"
    )
    metrics = _summary(scores["plain"])  # the headline numbers: no re-ranking, as papers report
    names = [n for n in ("mAP", "rank1", "rank5", "rank10", "mINP") if n in metrics]
    table = [(f"{n} (no re-ranking)", pct(metrics[n])) for n in names]
    reranked = None
    if "reranked" in scores:
        reranked = {
            **_summary(scores["reranked"]),
            "k1": cfg.eval.k1,
            "k2": cfg.eval.k2,
            "lambda": cfg.eval.lambda_value,
        }
        tag = f"k-reciprocal k1={cfg.eval.k1} k2={cfg.eval.k2} lambda={cfg.eval.lambda_value}"
        table += [(f"{n} ({tag})", pct(reranked[n])) for n in ("mAP", "rank1", "mINP")]
    record = {
        "task": "reid",
        "dataset": data.name,
        "layout": data.layout,
        "protocol": protocol,
        "backbone": model.backbone.provenance(),
        "prompt": model.backbone.describe_prompt(),
        "metrics": metrics,
        "metrics_reranked": reranked,
        "cmc": scores["plain"]["cmc"].tolist(),
        "data": data.summary(),
        "training": training.record(cfg.epochs),
        "history": training.history,
    }
    save_final_model(out, model)
    return write_results(out, cfg, record, title=f"Re-ID transfer: {data.name}", table=table)
