"""Top-down pose fine-tuning and COCO keypoint evaluation (ViTPose / SimpleBaseline protocol).

    clasp transfer pose --data data/coco --dataset coco --backbone runs/pretrain/backbone --out runs/pose-coco
    clasp transfer pose --data data/coco --dataset coco --backbone ... --out runs/pose-coco-det \
        data.detections=person_detection_results/COCO_val2017_detections_AP_H_56_person.json  # under --data
    accelerate launch --num_processes 8 .venv/bin/clasp transfer pose ... mixed_precision=bf16    # several GPUs

Recipe: person crops from the box grown to 256x192 (height:width) and padded 1.25; random scale
(+-35 %), rotation (+-40 deg, p 0.6) and flip; ViTPose's classic decoder (two deconvolutions) on the
last feature map, 17 heatmaps at 1/4 input; MSE against Gaussian targets (sigma 2) weighted by the
joints' labels (v > 0); AdamW with warmup + cosine. Test: flip test (heatmaps of the mirrored crop
flipped back with left/right joints swapped, averaged), argmax + quarter-pixel offset, person score =
box score x mean confidence of joints above 0.2, OKS-NMS at 0.9 per image, then pycocotools OKS AP/AR
on ground-truth boxes or on a detections file. The run resumes from ``out/checkpoint.pt``.
``data.encoding=udp`` and ``backbone.layer_decay`` give ViTPose's UDP and layer-wise lr decay
and ``data.half_body_prob`` its half-body augmentation (configs/transfer/pose_coco.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from torch import nn

from pipeline.config import AT_LEAST_ONE, POSITIVE
from pipeline.errors import ClaspError
from pipeline.formats import write_json_atomic
from transfer.backbone import BackboneConfig, build_backbone, part_prompt_backbone
from transfer.data import BatchConfig
from transfer.loop import FineTuneResult, LossFn, Training, predict_in_order, prepare_training
from transfer.optim import OptimConfig
from transfer.pose.datasets import (
    NUM_JOINTS,
    CropSettings,
    PersonBox,
    PoseCrops,
    PoseData,
    apply_affine,
    flip_permutation,
    load_coco_keypoints,
)
from transfer.pose.heatmaps import decode_heatmaps, decode_heatmaps_dark, from_heatmap_coords
from transfer.pose.metrics import COCO_KEYPOINT_SIGMAS, KEYPOINT_STAT_NAMES, coco_keypoint_ap
from transfer.pose.model import PoseModel
from transfer.results import pct, save_final_model, write_results
from transfer.task import FineTuneConfig, FineTuneTask


@dataclass
class PoseDataConfig(BatchConfig):
    img_size: Annotated[tuple[int, int], POSITIVE] = (256, 192)  # (height, width) of the crop
    sigma: float = 2.0  # Gaussian target, heatmap pixels
    padding: float = 1.25
    flip_prob: float = 0.5
    scale_factor: float = 0.35
    rotation_factor: float = 40.0
    rotation_prob: float = 0.6
    half_body_prob: float = 0.0  # ViTPose: 0.3 (crop the upper or lower body of people with > 8 labelled joints)
    train_split: str = "train2017"
    test_split: str = "val2017"
    detections: str = ""  # person detections JSON for evaluation (relative: under --data); empty = ground-truth boxes
    encoding: Literal["classic", "udp"] = "classic"  # heatmap mapping + decoding: SimpleBaseline's or UDP (ViTPose)
    det_score_thr: float = 0.0


@dataclass
class PoseHeadConfig:
    kind: Literal["classic", "simple"] = "classic"
    channels: int = 256


@dataclass
class PoseEvalConfig:
    flip_test: bool = True
    in_vis_thr: float = 0.2  # joints above this confidence make the person score
    oks_nms_thr: float = 0.9  # 0 = no OKS-NMS
    batch_size: int = 64


@dataclass
class PoseConfig(FineTuneConfig):
    dataset: str = "coco"
    backbone: BackboneConfig = field(default_factory=part_prompt_backbone)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(name="adamw", lr=5e-4, weight_decay=0.1, warmup_epochs=1.0)
    )
    epochs: Annotated[int, AT_LEAST_ONE] = 210
    data: PoseDataConfig = field(default_factory=PoseDataConfig)
    head: PoseHeadConfig = field(default_factory=PoseHeadConfig)
    eval: PoseEvalConfig = field(default_factory=PoseEvalConfig)


CONFIG = PoseConfig
DECODING = {
    "classic": "argmax + quarter-pixel offset",
    "udp": "UDP (unit-length heatmap mapping, DARK refinement with an 11-px blur)",
}
DATASETS = ("coco",)


def heatmap_loss(heatmaps: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Joint-weighted MSE: 0.5 x mean over joints and pixels of (weight x (prediction - target))^2."""
    diff = (heatmaps.float() - targets) * weights[:, :, None, None]
    return 0.5 * diff.pow(2).mean()


class PoseTask(FineTuneTask[PoseConfig, PoseData]):
    name = "pose"
    config = PoseConfig
    data_hint = "COCO folder"
    datasets = DATASETS

    def load_data(self, cfg: PoseConfig) -> PoseData:
        return load_coco_keypoints(
            cfg.data_dir,
            train_split=cfg.data.train_split,
            test_split=cfg.data.test_split,
            detections=cfg.data.detections,
            det_score_thr=cfg.data.det_score_thr,
        )

    def build_model(self, cfg: PoseConfig, data: PoseData) -> PoseModel:
        backbone = build_backbone(cfg.backbone, tuple(cfg.data.img_size))
        h, w = cfg.data.img_size
        if h % backbone.patch_size or w % backbone.patch_size:
            raise ClaspError(
                f"data.img_size {h}x{w} must be a multiple of the backbone's patch size {backbone.patch_size}"
            )
        return PoseModel(backbone, NUM_JOINTS, head=cfg.head.kind, channels=cfg.head.channels)

    def prepare(self, cfg: PoseConfig, data: PoseData, model: PoseModel, accelerator: Any) -> Training:
        settings = crop_settings(cfg, model.stride)
        bb = model.backbone
        train_set = PoseCrops(data.train, settings, mean=bb.mean, std=bb.std, train=True, seed=cfg.seed)
        return prepare_training(accelerator, cfg, cfg.data, model, train_set, seed=cfg.seed, quiet=cfg.quiet)

    def loss_fn(self, cfg: PoseConfig, data: PoseData, accelerator: Any) -> LossFn:
        def loss_fn(net: nn.Module, images: torch.Tensor, targets: Any) -> dict[str, torch.Tensor]:
            heatmaps, weights = targets
            return {"loss": heatmap_loss(net(images), heatmaps, weights)}

        return loss_fn

    def evaluate(self, cfg: PoseConfig, data: PoseData, model: PoseModel, accelerator: Any) -> list[dict[str, Any]]:
        return predict_keypoints(model, data.test, cfg, accelerator)

    def write(
        self, out: Path, cfg: PoseConfig, data: PoseData, model: PoseModel, scores: Any, training: FineTuneResult
    ) -> dict[str, Any]:
        results_path = write_json_atomic(out / f"keypoints_{cfg.data.test_split}_results.json", scores)
        return _write(out, cfg, data, model, coco_keypoint_ap(data.test_gt, scores), results_path, training)


run = PoseTask().run


def crop_settings(cfg: PoseConfig, stride: int) -> CropSettings:
    d = cfg.data
    return CropSettings(
        img_size=tuple(d.img_size),
        stride=stride,
        sigma=d.sigma,
        padding=d.padding,
        flip_prob=d.flip_prob,
        scale_factor=d.scale_factor,
        rotation_factor=d.rotation_factor,
        rotation_prob=d.rotation_prob,
        udp=d.encoding == "udp",
        half_body_prob=d.half_body_prob,
    )


def predict_keypoints(
    model: PoseModel, people: list[PersonBox], cfg: PoseConfig, accelerator: Any
) -> list[dict[str, Any]]:
    """COCO keypoint results ``{image_id, category_id, keypoints, score}`` for the evaluation boxes."""
    if not people:
        return []
    dataset = PoseCrops(
        people, crop_settings(cfg, model.stride), mean=model.backbone.mean, std=model.backbone.std, train=False
    )
    perm = flip_permutation()
    settings = crop_settings(cfg, model.stride)
    decode = decode_heatmaps_dark if settings.udp else decode_heatmaps

    def joints(images: torch.Tensor) -> torch.Tensor:
        heatmaps = model(images).float()
        if cfg.eval.flip_test:
            mirrored = model(torch.flip(images, dims=[3])).float()
            heatmaps = 0.5 * (heatmaps + torch.flip(mirrored, dims=[3])[:, perm])
        return decode(heatmaps)

    model.eval()
    decoded = predict_in_order(
        accelerator, joints, dataset, batch_size=cfg.eval.batch_size, workers=cfg.data.workers
    ).numpy()
    results = []
    for index, person in enumerate(people):
        matrix, _ = dataset.affine(index)
        crop_xy = from_heatmap_coords(decoded[index, :, :2], model.stride, udp_scale=settings.udp_scale)
        xy = apply_affine(np.linalg.inv(matrix), crop_xy)
        confidence = decoded[index, :, 2]
        above = confidence > cfg.eval.in_vis_thr
        joint_score = float(confidence[above].mean()) if above.any() else 0.0
        _, size = dataset.box(index)
        results.append(
            {
                "image_id": person.image_id,
                "category_id": 1,
                "keypoints": np.column_stack([xy, confidence]).ravel().round(3).tolist(),
                "score": joint_score * person.score,
                "area": float(size[0] * size[1]),
            }
        )
    if cfg.eval.oks_nms_thr > 0:
        results = oks_nms(results, cfg.eval.oks_nms_thr)
    for res in results:
        res.pop("area")
    return results


def oks_nms(results: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """Per image, drop a pose whose OKS with a higher-scoring kept pose exceeds ``threshold`` (all joints,
    mean of the two crop areas as the scale, as SimpleBaseline's ``oks_nms``)."""
    variances = (2 * COCO_KEYPOINT_SIGMAS) ** 2
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for res in results:
        by_image.setdefault(res["image_id"], []).append(res)
    kept_all = []
    for poses in by_image.values():
        poses = sorted(poses, key=lambda r: -r["score"])
        xy = np.array([np.asarray(r["keypoints"]).reshape(-1, 3)[:, :2] for r in poses])
        area = np.array([r["area"] for r in poses])
        alive = np.ones(len(poses), bool)
        for i in range(len(poses)):
            if not alive[i]:
                continue
            kept_all.append(poses[i])
            rest = np.flatnonzero(alive[i + 1 :]) + i + 1
            if rest.size == 0:
                continue
            d2 = ((xy[rest] - xy[i]) ** 2).sum(axis=2)
            e = d2 / variances / ((area[rest] + area[i])[:, None] / 2 + np.spacing(1)) / 2
            oks = np.exp(-e).mean(axis=1)
            alive[rest[oks > threshold]] = False
    return kept_all


def _write(
    out: Path,
    cfg: PoseConfig,
    data: PoseData,
    model: PoseModel,
    scores: dict[str, float],
    results_path: Path,
    training: FineTuneResult,
) -> dict[str, Any]:
    h, w = cfg.data.img_size
    protocol = (
        f"COCO OKS keypoint AP/AR (pycocotools COCOeval, iouType keypoints) on {cfg.data.test_split}; "
        f"person boxes: {data.boxes}; input {h}x{w} (box padded {cfg.data.padding}), heatmaps "
        f"{h // model.stride}x{w // model.stride} (sigma {cfg.data.sigma}); flip test "
        f"{'on' if cfg.eval.flip_test else 'off'}; {DECODING[cfg.data.encoding]}; person score = box score x "
        f"mean joint confidence above {cfg.eval.in_vis_thr}; "
        + (f"OKS-NMS {cfg.eval.oks_nms_thr}" if cfg.eval.oks_nms_thr > 0 else "no OKS-NMS")
    )
    record = {
        "task": "pose",
        "dataset": data.name,
        "layout": data.layout,
        "protocol": protocol,
        "backbone": model.backbone.provenance(),
        "prompt": model.backbone.describe_prompt(),
        "head": f"{cfg.head.kind} decoder ({cfg.head.channels} channels)",
        "metrics": scores,
        "results_file": results_path.name,
        "data": data.summary(),
        "training": training.record(cfg.epochs, loss_digits=6),
        "history": training.history,
    }
    save_final_model(out, model)
    # pycocotools reports -1 where no ground truth falls in an area range (e.g. no large people)
    table = [(name, pct(scores[name]) if scores[name] >= 0 else "n/a (no people)") for name in KEYPOINT_STAT_NAMES]
    return write_results(out, cfg, record, title=f"Pose transfer: {data.name} {cfg.data.test_split}", table=table)
