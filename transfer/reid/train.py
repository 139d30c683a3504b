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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch

from pipeline.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE
from pipeline.errors import ClaspError
from transfer.backbone import BackboneConfig, FeatureBackbone, build_backbone
from transfer.common import (
    ImageDataset,
    OptimConfig,
    build_optimizer,
    describe_batch,
    fine_tune,
    finished_results,
    make_accelerator,
    pct,
    per_process_batch,
    predict_in_order,
    save_final_model,
    write_results,
)
from transfer.reid import metrics as reid_metrics
from transfer.reid.datasets import ReidData, load_reid_dataset
from transfer.reid.losses import ReidLoss
from transfer.reid.model import ReidModel
from transfer.reid.rerank import k_reciprocal_rerank
from transfer.reid.sampler import PKBatchSampler


@dataclass
class ReidDataConfig:
    img_size: Annotated[tuple[int, int], POSITIVE] = (256, 128)  # (height, width); 384x128 is the other common setting
    p_identities: Annotated[int, POSITIVE] = 16
    k_instances: Annotated[int, POSITIVE] = 4
    global_batch: Annotated[int, NON_NEGATIVE] = 0  # >0: P x K images over all processes; P per process derived
    workers: int = 8
    flip_prob: float = 0.5
    padding_px: int = 10
    erasing_prob: float = 0.5
    msmt17_with_val: bool = True  # MSMT17: train on list_train + list_val (TransReID / SOLIDER)


@dataclass
class ReidLossConfig:
    label_smoothing: float = 0.1
    triplet_margin: float | None = 0.3  # null = soft margin
    id_weight: float = 1.0
    triplet_weight: float = 1.0


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
class ReidConfig:
    data_dir: str = ""
    dataset: str = "market1501"
    out_dir: str = ""
    backbone: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(prompt="learned", prompt_mix={"instance": 0.8, "attribute": 0.2})
    )
    data: ReidDataConfig = field(default_factory=ReidDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: ReidLossConfig = field(default_factory=ReidLossConfig)
    eval: ReidEvalConfig = field(default_factory=ReidEvalConfig)
    epochs: Annotated[int, AT_LEAST_ONE] = 120
    max_steps_per_epoch: int = 0  # 0 = full epochs; >0 caps them (smoke tests)
    seed: int = 0
    device: str = "auto"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    quiet: bool = False


CONFIG = ReidConfig


def transforms(backbone: FeatureBackbone, cfg: ReidDataConfig, *, train: bool) -> Any:
    import torchvision.transforms as T
    from timm.data.random_erasing import RandomErasing

    size = tuple(cfg.img_size)
    ops: list[Any] = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        ops += [T.RandomHorizontalFlip(cfg.flip_prob), T.Pad(cfg.padding_px), T.RandomCrop(size)]
    ops += [T.ToTensor(), T.Normalize(backbone.mean, backbone.std)]
    if train and cfg.erasing_prob > 0:
        ops.append(RandomErasing(probability=cfg.erasing_prob, mode="pixel", max_count=1, device="cpu"))
    return T.Compose(ops)


def identities_per_batch(cfg: ReidConfig, accelerator: Any) -> int:
    """P of the per-process P x K batch (``data.global_batch`` split over the processes, else
    ``data.p_identities``); the global batch is printed on the main process."""
    k, n = cfg.data.k_instances, accelerator.num_processes
    batch = per_process_batch(
        global_batch=cfg.data.global_batch,
        batch_size=cfg.data.p_identities * k,
        num_processes=n,
        key="data.global_batch",
        unit=k,
    )
    if accelerator.is_main_process and not cfg.quiet:
        print(f"{describe_batch(batch, n, cfg.data.global_batch)}: {batch // k} identities x {k} images per process")
    return batch // k


def run(cfg: ReidConfig) -> dict[str, Any]:
    """Fine-tune on ``cfg.dataset`` and write results.json / results.md / model.safetensors to ``cfg.out_dir``."""
    if not cfg.data_dir or not cfg.out_dir:
        raise ClaspError("transfer reid needs --data (dataset folder) and --out (output folder)")
    out = Path(cfg.out_dir)
    finished = finished_results(out, cfg)
    if finished is not None:
        return finished
    data = load_reid_dataset(cfg.dataset, cfg.data_dir, msmt17_with_val=cfg.data.msmt17_with_val)
    accelerator, device = make_accelerator(cfg)

    # --- model, P x K data, optimiser
    backbone = build_backbone(cfg.backbone, tuple(cfg.data.img_size))
    model = ReidModel(backbone, data.num_train_ids)
    pids = [pid for _, pid, _ in data.train]
    sampler = PKBatchSampler(pids, identities_per_batch(cfg, accelerator), cfg.data.k_instances, seed=cfg.seed)
    train_set = ImageDataset([p for p, _, _ in data.train], pids, transforms(backbone, cfg.data, train=True))
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.data.workers)
    steps_per_epoch = math.ceil(len(sampler) / accelerator.num_processes)
    if cfg.max_steps_per_epoch > 0:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    optimizer, schedule = build_optimizer(model, cfg.optim, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs)
    criterion = ReidLoss(
        label_smoothing=cfg.loss.label_smoothing,
        triplet_margin=cfg.loss.triplet_margin,
        id_weight=cfg.loss.id_weight,
        triplet_weight=cfg.loss.triplet_weight,
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    def loss_fn(net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, feats = net(images)
        return criterion(logits, feats, targets)

    # --- train, evaluate, write
    training = fine_tune(
        accelerator,
        cfg,
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        loader=loader,
        loss_fn=loss_fn,
        steps_per_epoch=steps_per_epoch,
        set_epoch=sampler.set_epoch,
        name="reid",
    )
    model = accelerator.unwrap_model(model)
    scores = evaluate(model, data, cfg, accelerator)
    record: dict[str, Any] = {}
    if accelerator.is_main_process:
        record = _write(out, cfg, data, model, scores, {**training, "device": device})
    accelerator.wait_for_everyone()
    return record


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
    out: Path, cfg: ReidConfig, data: ReidData, model: ReidModel, scores: dict[str, Any], training: dict[str, Any]
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
    history = training["history"]
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
        "training": {
            "epochs": cfg.epochs,
            "steps": training["steps"],
            "wall_s": training["wall_s"],
            "device": training["device"],
            "final_loss": round(history[-1]["loss"], 4) if history else None,
        },
        "history": history,
    }
    save_final_model(out, model)
    return write_results(out, cfg, record, title=f"Re-ID transfer: {data.name}", table=table)
