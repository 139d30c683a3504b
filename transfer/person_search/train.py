"""Person search transfer: fine-tune a detector and a re-ID embedding, evaluate CUHK-SYSU / PRW mAP and top-1.

    clasp transfer person-search --data data/cuhk_sysu --dataset cuhk_sysu --backbone runs/pretrain/backbone \
        --out runs/ps-cuhk                                 # gallery size 100; eval.gallery_size=50..4000 or -1
    clasp transfer person-search --data data/PRW-v16.04.20 --dataset prw --backbone runs/pretrain/backbone \
        --out runs/ps-prw mixed_precision=bf16
    clasp transfer person-search -c configs/transfer/person_search_synthetic.yaml --data data/synth/cuhk_sysu \
        --backbone runs/demo/backbones/clasp-s0-ee4998b9 --out runs/ps-synth

Two stages, both from the same pre-trained backbone (``model.py``): (1) a Faster R-CNN on a ViTDet simple
feature pyramid (``transfer.detection.model``, part prompt by default) trained on every annotated person of the
training scenes; (2) a BNNeck re-ID model (stage 3a's recipe: ID + triplet loss, P x K batches, flip / pad /
erasing) trained on ground-truth crops of the training identities (instance + attribute prompt).
Evaluation: the detector runs on every gallery frame, its boxes (score >= ``eval.det_thresh``) and the given
query boxes are embedded, and ``transfer.person_search.metrics`` computes mAP / top-k with the OIM/SeqNet
protocol. The same embedding on the ground-truth boxes is reported too ("GT boxes"), which separates
detection from re-identification errors. Each stage resumes from ``out/<stage>/checkpoint.pt``.
Evaluation runs on the main process.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch

from pipeline.config import AT_LEAST_ONE, NON_NEGATIVE
from pipeline.errors import ClaspError
from pipeline.progress import progress
from transfer.backbone import BackboneConfig, build_backbone
from transfer.data import describe_batch, per_process_batch, read_rgb
from transfer.loop import FineTuneResult, LoopConfig, Training, fine_tune, make_accelerator
from transfer.optim import OptimConfig, build_optimizer
from transfer.person_search import metrics as ps_metrics
from transfer.person_search.datasets import UNLABELED, PersonSearchData, SceneAnnotation, load_person_search
from transfer.person_search.model import TwoStageSearcher, crop_people
from transfer.person_search.training_data import CropDataset, SceneDataset, collate_scenes
from transfer.reid import identity
from transfer.reid.model import ReidModel
from transfer.results import finished_results, pct, save_final_model, write_results
from transfer.task import TaskConfig, start


@dataclass
class DetectorConfig(LoopConfig):
    img_size: tuple[int, int] = (896, 1504)  # (height, width) the ViT is built for; other sizes are resampled
    min_size: int = 900  # torchvision resize: shorter side (SeqNet's 900 x 1500)
    max_size: int = 1500
    batch_size: int = 4  # scenes per process (when global_batch is 0)
    global_batch: Annotated[int, NON_NEGATIVE] = 0  # >0: scenes per step over all processes (per-process derived)
    epochs: Annotated[int, AT_LEAST_ONE] = 20
    flip_prob: float = 0.5
    prompt: str = "learned"  # MoE prompt of the detector's backbone copy (overrides backbone.prompt)
    prompt_mix: dict[str, float] = field(default_factory=lambda: {"part": 1.0})
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(name="adamw", lr=1e-4, weight_decay=0.05, warmup_epochs=1.0)
    )
    box_score_thresh: float = 0.05
    detections_per_img: int = 100
    out_channels: int = 256  # pyramid width
    representation_size: int = 1024  # box head MLP width
    extra: dict[str, Any] = field(default_factory=dict)  # further build_detector / FasterRCNN keywords


@dataclass
class EmbedConfig(LoopConfig):
    """The re-ID embedding stage: stage 3a's recipe on ground-truth crops (flip, pad + crop, random erasing)."""

    epochs: Annotated[int, AT_LEAST_ONE] = 60
    data: identity.IdentityBatchConfig = field(default_factory=identity.IdentityBatchConfig)
    loss: identity.ReidLossConfig = field(default_factory=identity.ReidLossConfig)


@dataclass
class SearchEvalConfig:
    gallery_size: int = 100  # CUHK-SYSU: 50, 100, 500, 1000, 2000, 4000 (a TestG<size>.mat), -1 = full test set
    det_thresh: float = 0.5  # detections below it are not searched (the reference protocol)
    cross_camera_only: bool = False  # PRW: search other cameras only (published numbers: False)
    gt_boxes: bool = True  # also report search on ground-truth boxes
    batch_size: int = 64  # crops per embedding batch


@dataclass
class PersonSearchConfig(TaskConfig):
    dataset: Literal["cuhk_sysu", "prw"] = "cuhk_sysu"
    backbone: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(prompt="learned", prompt_mix={"instance": 0.8, "attribute": 0.2})
    )  # spec and settings of both stages; prompt / prompt_mix are the re-ID embedding's
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    eval: SearchEvalConfig = field(default_factory=SearchEvalConfig)
    workers: int = 4


CONFIG = PersonSearchConfig


# --- the two stages -------------------------------------------------------------------------------


def build_searcher(cfg: PersonSearchConfig, num_train_ids: int) -> TwoStageSearcher:
    """Detector and re-ID model from ``cfg.backbone`` (the detector under ``detector.prompt`` / ``prompt_mix``)."""
    from transfer.detection.model import build_detector

    det_backbone = dataclasses.replace(cfg.backbone, prompt=cfg.detector.prompt, prompt_mix=cfg.detector.prompt_mix)
    detector = build_detector(
        det_backbone,
        img_size=tuple(cfg.detector.img_size),
        min_size=cfg.detector.min_size,
        max_size=cfg.detector.max_size,
        num_classes=2,
        box_score_thresh=cfg.detector.box_score_thresh,
        box_detections_per_img=cfg.detector.detections_per_img,
        out_channels=cfg.detector.out_channels,
        representation_size=cfg.detector.representation_size,
        **cfg.detector.extra,
    )
    reid = ReidModel(build_backbone(cfg.backbone, tuple(cfg.embed.data.img_size)), num_train_ids)
    return TwoStageSearcher(detector, reid)


def detector_batch(cfg: PersonSearchConfig, accelerator: Any) -> int:
    """Scenes per process per step: ``detector.global_batch`` split over the processes, else ``batch_size``."""
    dcfg, n = cfg.detector, accelerator.num_processes
    batch = per_process_batch(
        global_batch=dcfg.global_batch, batch_size=dcfg.batch_size, num_processes=n, key="detector.global_batch"
    )
    if accelerator.is_main_process and not cfg.quiet:
        print(f"detector: {describe_batch(batch, n, dcfg.global_batch)}")
    return batch


def embedding_identities(cfg: PersonSearchConfig, accelerator: Any) -> int:
    """P of the embedding stage's per-process P x K batch (``embed.data.global_batch`` split over the processes)."""
    return identity.identities_per_process(
        cfg.embed.data, accelerator, key="embed.data.global_batch", quiet=cfg.quiet, label="embedding: "
    )


def train_detector(
    searcher: TwoStageSearcher, data: PersonSearchData, cfg: PersonSearchConfig, accelerator: Any
) -> FineTuneResult:
    """Fine-tune the detector on every annotated person of the training scenes (labelled or not)."""
    dcfg = cfg.detector
    scenes = [s for s in data.train if len(s.pids)]
    batch_size = detector_batch(cfg, accelerator)
    loader = torch.utils.data.DataLoader(
        SceneDataset(scenes, flip_prob=dcfg.flip_prob),
        batch_size=batch_size,
        shuffle=True,
        num_workers=cfg.workers,
        collate_fn=collate_scenes,
        drop_last=len(scenes) > batch_size,
    )
    steps = dcfg.cap(math.ceil(len(loader) / accelerator.num_processes))
    optimizer, schedule = build_optimizer(searcher.detector, dcfg.optim, steps_per_epoch=steps, epochs=dcfg.epochs)
    model, optimizer, loader = accelerator.prepare(searcher.detector, optimizer, loader)

    def loss_fn(net: torch.nn.Module, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        sizes = [t["size"].tolist() for t in targets]
        inputs = [image[:, :h, :w] for image, (h, w) in zip(images, sizes, strict=True)]
        losses = net(inputs, [{k: v for k, v in t.items() if k != "size"} for t in targets])
        return {"loss": sum(losses.values()), **{k: v.detach() for k, v in losses.items()}}

    training = Training(model, optimizer, schedule, loader, steps, set_epoch=lambda epoch: None)
    result = fine_tune(
        accelerator, dcfg, training, loss_fn=loss_fn, out_dir=Path(cfg.out_dir) / "detector", run_config=cfg,
        name="detector", quiet=cfg.quiet,
    )  # fmt: skip
    searcher.detector = accelerator.unwrap_model(model)
    return result


def train_embedding(
    searcher: TwoStageSearcher, data: PersonSearchData, cfg: PersonSearchConfig, accelerator: Any
) -> FineTuneResult:
    """Fine-tune the re-ID model on ground-truth crops of the training identities (re-ID's P x K recipe)."""
    ecfg = cfg.embed
    labels = {pid: i for i, pid in enumerate(data.train_ids)}
    items = [
        (scene.path, box, labels[int(pid)])
        for scene in data.train
        for box, pid in zip(scene.boxes_xyxy, scene.pids, strict=True)
        if pid != UNLABELED
    ]
    if len(labels) < 2:
        raise ClaspError(f"{data.root}: person search training needs at least 2 labelled identities")
    identities = embedding_identities(cfg, accelerator)
    crops = CropDataset(items, identity.transforms(searcher.reid.backbone, ecfg.data, train=True))
    training = identity.identity_training(
        accelerator, ecfg, searcher.reid, crops, [it[2] for it in items], identities=identities,
        k_instances=ecfg.data.k_instances, workers=cfg.workers, seed=cfg.seed,
    )  # fmt: skip
    loss_fn = identity.id_triplet_loss(ecfg.loss)
    result = fine_tune(
        accelerator, ecfg, training, loss_fn=loss_fn, out_dir=Path(cfg.out_dir) / "embedding", run_config=cfg,
        name="embedding", quiet=cfg.quiet,
    )  # fmt: skip
    searcher.reid = accelerator.unwrap_model(training.model)
    return result


# --- evaluation -----------------------------------------------------------------------------------


def gallery_frames(data: PersonSearchData, cfg: PersonSearchConfig) -> list[SceneAnnotation]:
    """The test scenes the chosen protocol searches (CUHK-SYSU: those of the chosen galleries)."""
    protocol = data.cuhk_protocol
    if protocol is None:
        return data.gallery
    size = cfg.eval.gallery_size
    if (50 if size == -1 else size) not in protocol.galleries:
        raise ClaspError(
            f"eval.gallery_size={size}: {data.root} has galleries of sizes {sorted(protocol.galleries)} only "
            "(annotation/test/train_test/TestG<size>.mat; -1, the full test set, needs TestG50.mat); pick one of those"
        )
    if size == -1:
        return data.gallery
    needed = {name for gallery in protocol.galleries[size] for name, _ in gallery}
    return [s for s in data.gallery if s.name in needed]


def search_scores(
    data: PersonSearchData,
    query_feats: np.ndarray,
    detections: dict[str, ps_metrics.FrameDetections],
    cfg: PersonSearchConfig,
) -> dict[str, Any]:
    """mAP / top-k of ``data``'s protocol (CUHK-SYSU gallery size or PRW) for the given features."""
    if data.cuhk_protocol is not None:
        return ps_metrics.cuhk_sysu_search_map(
            query_feats,
            data.cuhk_protocol,
            detections,
            gallery_size=cfg.eval.gallery_size,
            det_thresh=cfg.eval.det_thresh,
        )
    return ps_metrics.prw_search_map(
        query_feats,
        data.prw_queries(),
        data.prw_frames(),
        detections,
        cross_camera_only=cfg.eval.cross_camera_only,
        det_thresh=cfg.eval.det_thresh,
    )


def evaluate(searcher: TwoStageSearcher, data: PersonSearchData, cfg: PersonSearchConfig) -> dict[str, Any]:
    """Detect + embed every gallery frame (and its GT boxes), embed the queries, score the protocol."""
    from torchvision.ops import box_iou

    device = next(searcher.parameters()).device
    transform = identity.transforms(searcher.reid.backbone, cfg.embed.data, train=False)
    frames = gallery_frames(data, cfg)
    detected, on_gt = {}, {}
    found = total = n_boxes = 0
    t0 = time.perf_counter()
    with progress(len(frames), "search gallery", quiet=cfg.quiet, unit="frame") as advance:
        for scene in frames:
            image = read_rgb(scene.path)
            tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255.0).to(device)
            boxes, scores = searcher.detect([tensor])[0]
            keep = scores >= cfg.eval.det_thresh
            boxes, scores = boxes[keep], scores[keep]
            n_gt = len(scene.boxes_xyxy) if cfg.eval.gt_boxes else 0
            both = np.concatenate([boxes.reshape(-1, 4), scene.boxes_xyxy[:n_gt].reshape(-1, 4)])
            feats = searcher.embed(crop_people(image, both, transform), batch_size=cfg.eval.batch_size)
            detected[scene.name] = ps_metrics.FrameDetections(boxes, scores, feats[: len(boxes)])
            if n_gt:
                on_gt[scene.name] = ps_metrics.FrameDetections(
                    scene.boxes_xyxy, np.ones(n_gt, np.float32), feats[len(boxes) :]
                )
            n_boxes += len(boxes)
            if len(scene.boxes_xyxy):
                total += len(scene.boxes_xyxy)
                if len(boxes):
                    iou = box_iou(torch.as_tensor(scene.boxes_xyxy), torch.as_tensor(boxes))
                    found += int((iou.max(dim=1).values >= 0.5).sum())
            advance(1)
    query_crops = torch.cat([crop_people(read_rgb(q.path), q.box_xyxy[None], transform) for q in data.queries])
    query_feats = searcher.embed(query_crops, batch_size=cfg.eval.batch_size)
    scores = {"detected": search_scores(data, query_feats, detected, cfg)}
    if cfg.eval.gt_boxes:
        scores["gt_boxes"] = search_scores(data, query_feats, on_gt, cfg)
    scores["detection"] = {
        "recall_iou0.5": found / max(1, total),
        "boxes_per_frame": n_boxes / max(1, len(frames)),
        "frames": len(frames),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    return scores


# --- run ------------------------------------------------------------------------------------------


class PersonSearchTask:
    """Two stages from one backbone, each through the shared fine-tune loop with its own checkpoint folder."""

    name = "person-search"
    config = PersonSearchConfig
    data_hint = "dataset folder"
    datasets = ()  # the reader names the choices

    def run(self, cfg: PersonSearchConfig) -> dict[str, Any]:
        """Train both stages on ``cfg.dataset`` and write results.json / results.md / models to ``cfg.out_dir``."""
        out = start(self, cfg)
        finished = finished_results(out, cfg)
        if finished is not None:
            return finished
        size = cfg.eval.gallery_size
        data = load_person_search(cfg.dataset, cfg.data_dir, gallery_sizes=[50 if size == -1 else size])
        gallery_frames(data, cfg)  # a wrong gallery size fails before training
        accelerator, device = make_accelerator(device=cfg.device, mixed_precision=cfg.mixed_precision, seed=cfg.seed)
        searcher = build_searcher(cfg, len(data.train_ids))
        training = {
            "detector": train_detector(searcher, data, cfg, accelerator),
            "embedding": train_embedding(searcher, data, cfg, accelerator),
        }
        record: dict[str, Any] = {}
        if accelerator.is_main_process:
            record = _write(out, cfg, data, searcher, evaluate(searcher, data, cfg), training, device)
        accelerator.wait_for_everyone()
        return record


run = PersonSearchTask().run


def _protocol(data: PersonSearchData, cfg: PersonSearchConfig) -> str:
    if data.cuhk_protocol is not None:
        size = cfg.eval.gallery_size
        gallery = "full test set (-1)" if size == -1 else f"gallery size {size} (TestG{size}.mat)"
        head = f"CUHK-SYSU test, {len(data.queries)} queries, {gallery}"
    else:
        cams = "other cameras only" if cfg.eval.cross_camera_only else "all cameras"
        head = f"PRW test, {len(data.queries)} queries, gallery = every other test frame ({cams})"
    h, w = cfg.embed.data.img_size
    return (
        f"{head}; OIM/SeqNet search evaluation (detections with score >= {cfg.eval.det_thresh}, IoU >= "
        f"min(0.5, wh/((w+10)(h+10))), AP x recall); two-stage: Faster R-CNN on a ViTDet pyramid "
        f"(shorter side {cfg.detector.min_size}, max {cfg.detector.max_size}) + BNNeck re-ID of {h}x{w} crops "
        "(L2-normalised BN feature, cosine)"
    )


def _summary(result: dict[str, Any]) -> dict[str, float]:
    return {k: result[k] for k in ("mAP", "top1", "top5", "top10") if k in result}


def _write(
    out: Path,
    cfg: PersonSearchConfig,
    data: PersonSearchData,
    searcher: TwoStageSearcher,
    scores: dict[str, Any],
    training: dict[str, FineTuneResult],
    device: str,
) -> dict[str, Any]:
    metrics = _summary(scores["detected"])
    gt = _summary(scores["gt_boxes"]) if "gt_boxes" in scores else None
    table = [(f"{n} (detected boxes)", pct(metrics[n])) for n in ("mAP", "top1")]
    if gt is not None:
        table += [(f"{n} (ground-truth boxes)", pct(gt[n])) for n in ("mAP", "top1")]
    table.append(("detection recall at IoU 0.5 (score >= det_thresh)", pct(scores["detection"]["recall_iou0.5"])))

    def stage(t: FineTuneResult) -> dict[str, Any]:
        return {"steps": t.steps, "wall_s": t.wall_s, "final_loss": t.final_loss()}

    record = {
        "task": "person-search",
        "dataset": data.name,
        "layout": data.layout,
        "protocol": _protocol(data, cfg),
        "backbone": searcher.reid.backbone.provenance(),
        "prompt": (
            f"detector {searcher.detector.backbone.vit.describe_prompt()}; "
            f"embedding {searcher.reid.backbone.describe_prompt()}"
        ),
        "metrics": metrics,
        "metrics_gt_boxes": gt,
        "detection": scores["detection"],
        "ap_per_query": scores["detected"]["ap_per_query"],
        "data": data.summary(),
        "training": {
            "device": device,
            "detector": stage(training["detector"]),
            "embedding": stage(training["embedding"]),
        },
        "history": {name: t.history for name, t in training.items()},
    }
    save_final_model(out, searcher)
    record = write_results(out, cfg, record, title=f"Person search transfer: {data.name}", table=table)
    for name in ("detector", "embedding"):  # the run is complete: stage checkpoints are no longer needed
        (out / name / "checkpoint.pt").unlink(missing_ok=True)
        if (out / name).is_dir() and not any((out / name).iterdir()):
            (out / name).rmdir()
    return record
