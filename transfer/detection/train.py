"""Pedestrian detection fine-tuning and CityPersons MR^-2 evaluation.

    clasp transfer detection --data data/CityPersons --dataset citypersons --backbone runs/demo/backbone --out runs/cp
    clasp transfer detection --data data/CityPersons --dataset citypersons --out runs/cp_eval detections=dets.json

Recipe: ViTDet simple feature pyramid on the last ViT map + torchvision Faster R-CNN with pedestrian
anchors (``transfer.detection.model``), backbone prompt ``learned`` initialised at the part prompt;
train on ``train`` with horizontal flip and a random shorter side from ``data.train_sizes``, positives
the pedestrians >= ``data.min_height_px`` tall, every other annotation an ignore region; AdamW with
warmup + cosine. Test: the final model on ``val`` at shorter side ``data.test_size``; detections written
in the official results format (``detections_val.json``: ``{image_id, category_id: 1, bbox [x, y, w,
h], score}``) and scored with ``transfer.detection.metrics`` (the official ``eval_MR_multisetup.py``
protocol: MR^-2 on Reasonable, Reasonable_small, Reasonable_occ=heavy and All; lower is better).

``detections=FILE`` skips training and scores an existing detections file on the ``val`` ground truth.
Resumes from ``out/checkpoint.pt``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import nn

from pipeline.config import AT_LEAST_ONE, POSITIVE
from pipeline.errors import ClaspError
from pipeline.formats import write_json_atomic
from transfer.backbone import BackboneConfig, part_prompt_backbone
from transfer.data import BatchConfig
from transfer.detection.datasets import LAYOUT, CityPersonsDataset, CityPersonsSplit, collate, load_citypersons
from transfer.detection.metrics import SETUPS, citypersons_all_setups
from transfer.detection.model import PEDESTRIAN_ASPECT_RATIO, build_detector
from transfer.loop import FineTuneResult, LossFn, Training, prepare_training
from transfer.optim import OptimConfig
from transfer.results import finished_results, pct, save_final_model, write_results
from transfer.task import FineTuneConfig, FineTuneTask, start

DATASETS = ("citypersons",)
DETECTIONS_FILE = "detections_val.json"
PROTOCOL = (
    "CityPersons MR^-2 (log-average miss rate over 9 FPPI points in [1e-2, 1e0], IoU 0.5, ignore regions by "
    "IoA) per the official eval_MR_multisetup.py, setups Reasonable (h >= 50 px, vis >= 0.65), Reasonable_small "
    "(50..75 px), Reasonable_occ=heavy (vis 0.2..0.65), All (h >= 20, vis >= 0.2); lower is better"
)


@dataclass
class DetDataConfig(BatchConfig):
    batch_size: Annotated[int, POSITIVE] = 2
    workers: int = 4
    train_split: str = "train"
    val_split: str = "val"
    train_sizes: tuple[int, ...] = (1024,)  # shorter side(s) in training; several = multi-scale training
    test_size: int = 1024  # shorter side at test time (1024 = CityPersons' original 2048x1024)
    max_size: int = 2048
    flip_prob: float = 0.5
    min_height_px: float = 50.0  # training positives (Pedestron / CSP "h50"); the rest are ignore regions
    min_vis_ratio: float = 0.0
    skip_empty: bool = True  # train only on images with at least one positive


@dataclass
class DetModelConfig:
    out_channels: int = 256
    representation_size: int = 1024
    p6: bool = True
    aspect_ratios: tuple[float, ...] = (PEDESTRIAN_ASPECT_RATIO,)
    score_thresh: float = 0.01  # low, so the miss-rate curve reaches FPPI 1
    detections_per_img: int = 100
    extra: dict[str, Any] = field(default_factory=dict)  # further FasterRCNN keywords, e.g. rpn_nms_thresh


@dataclass
class DetConfig(FineTuneConfig):
    dataset: str = "citypersons"
    backbone: BackboneConfig = field(default_factory=part_prompt_backbone)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            name="adamw", lr=1e-4, weight_decay=0.1, warmup_epochs=1.0, min_lr_factor=0.01, grad_clip=1.0
        )
    )
    epochs: Annotated[int, AT_LEAST_ONE] = 12
    data: DetDataConfig = field(default_factory=DetDataConfig)
    model: DetModelConfig = field(default_factory=DetModelConfig)
    # Mean teacher (SOLIDER/Pedestron's CSP: alpha 0.999): an exponential moving average of the weights,
    # updated after every step; the average is what is evaluated and saved. 0 = off (the final weights).
    ema_decay: float = 0.0
    detections: str = ""  # score this detections file on the val split instead of training


CONFIG = DetConfig


def detector_for(cfg: DetConfig, img_size: tuple[int, int]) -> nn.Module:
    m = cfg.model
    return build_detector(
        cfg.backbone,
        img_size=img_size,
        min_size=tuple(cfg.data.train_sizes),  # predict() switches to test_size
        max_size=cfg.data.max_size,
        num_classes=2,
        out_channels=m.out_channels,
        representation_size=m.representation_size,
        p6=m.p6,
        aspect_ratios=tuple(m.aspect_ratios),
        box_score_thresh=m.score_thresh,
        box_detections_per_img=m.detections_per_img,
        **m.extra,
    )


def _vit_size(cfg: DetConfig, data: CityPersonsSplit) -> tuple[int, int]:
    """(H, W) at the test scale, multiples of 32: what the ViT's position embeddings are resampled to."""
    image = data.gt["images"][0]
    height, width = float(image["height"]), float(image["width"])
    scale = min(cfg.data.test_size / min(height, width), cfg.data.max_size / max(height, width))
    return (int(math.ceil(height * scale / 32) * 32), int(math.ceil(width * scale / 32) * 32))


@dataclass
class DetData:
    val: CityPersonsSplit
    train: CityPersonsDataset  # the training images with positives, as the loader reads them


class DetectionTask(FineTuneTask[DetConfig, DetData]):
    name = "detection"
    config = DetConfig
    data_hint = "CityPersons folder"
    datasets = DATASETS

    def run(self, cfg: DetConfig) -> dict[str, Any]:
        """Fine-tune on CityPersons train (or take ``cfg.detections``), score val, write results to ``cfg.out_dir``."""
        if not cfg.detections:
            return super().run(cfg)
        out = start(self, cfg)
        finished = finished_results(out, cfg)
        if finished is not None:
            return finished
        val = load_citypersons(cfg.data_dir, cfg.data.val_split)
        path = Path(cfg.detections)
        if not path.is_file():
            raise ClaspError(f"detections file {path} does not exist (set detections= to a JSON results file)")
        return _write(out, cfg, val, citypersons_all_setups(val.gt, path), {"detections": str(path)}, None)

    def load_data(self, cfg: DetConfig) -> DetData:
        val = load_citypersons(cfg.data_dir, cfg.data.val_split)
        train = load_citypersons(cfg.data_dir, cfg.data.train_split)
        d = cfg.data
        train_set = CityPersonsDataset(
            train, train=True, flip_prob=d.flip_prob, min_height_px=d.min_height_px, min_vis_ratio=d.min_vis_ratio,
            skip_empty=d.skip_empty,
        )  # fmt: skip
        if len(train_set) == 0:
            raise ClaspError(f"{train.gt_file}: no image has a pedestrian >= {d.min_height_px} px to train on")
        return DetData(val, train_set)

    def build_model(self, cfg: DetConfig, data: DetData) -> nn.Module:
        return detector_for(cfg, _vit_size(cfg, data.val))

    def prepare(self, cfg: DetConfig, data: DetData, model: nn.Module, accelerator: Any) -> Training:
        return prepare_training(
            accelerator, cfg, cfg.data, model, data.train, seed=cfg.seed, quiet=cfg.quiet, collate_fn=collate
        )

    def make_ema(self, cfg: DetConfig, model: nn.Module) -> Any:
        if cfg.ema_decay <= 0:
            return None
        from timm.utils import ModelEmaV3

        return ModelEmaV3(model, decay=cfg.ema_decay)

    def loss_fn(self, cfg: DetConfig, data: DetData, accelerator: Any) -> LossFn:
        def loss_fn(net: nn.Module, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
            losses = net(list(images), targets)
            return {"loss": sum(losses.values()), **losses}

        return loss_fn

    def evaluate(self, cfg: DetConfig, data: DetData, model: nn.Module, accelerator: Any) -> list[dict[str, Any]]:
        return predict(model, data.val, cfg, accelerator)

    def write(
        self, out: Path, cfg: DetConfig, data: DetData, model: nn.Module, scores: Any, training: FineTuneResult
    ) -> dict[str, Any]:
        write_json_atomic(out / DETECTIONS_FILE, scores)
        extra = {"train": data.train.data.summary() | {"training_images": len(data.train)}}
        return _write(out, cfg, data.val, citypersons_all_setups(data.val.gt, scores), extra, model, training)


run = DetectionTask().run


@torch.no_grad()
def predict(model: nn.Module, data: CityPersonsSplit, cfg: DetConfig, accelerator: Any) -> list[dict[str, Any]]:
    """Official-format detections on every image of ``data`` (each process takes every n-th image)."""
    from accelerate.utils import gather_object

    dataset = CityPersonsDataset(data, train=False)
    mine = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, mine),
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.workers,
        collate_fn=collate,
    )
    model.eval()
    model.transform.min_size = (cfg.data.test_size,)
    results: list[dict[str, Any]] = []
    for images, targets, _ in loader:
        with accelerator.autocast():
            outputs = model(list(images.to(accelerator.device)))
        for target, output in zip(targets, outputs, strict=True):
            image_id = data.image_ids[int(target["image_id"])]
            boxes = output["boxes"].float().cpu()
            scores = output["scores"].float().cpu()
            labels = output["labels"].cpu()
            for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True):
                if label != 1:
                    continue
                x1, y1, x2, y2 = box
                results.append({"image_id": image_id, "category_id": 1,
                                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                                "score": round(score, 5)})  # fmt: skip
    if accelerator.num_processes > 1:
        results = gather_object(results)
    return results


def _write(
    out: Path,
    cfg: DetConfig,
    val: CityPersonsSplit,
    scores: dict[str, float],
    source: dict[str, Any],
    model: nn.Module | None,
    training: FineTuneResult | None = None,
) -> dict[str, Any]:
    """``source``: {"train": training data summary} after a fine-tune, {"detections": path} for a scored file."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = {name: (None if math.isnan(v) else float(v)) for name, v in scores.items()}
    protocol = f"{PROTOCOL}; {val.split} split ({len(val)} images, {val.gt_file.name})"
    if model is not None:
        weights = f"mean-teacher EMA {cfg.ema_decay}" if cfg.ema_decay > 0 else "final model"
        protocol += f"; {weights}, test shorter side {cfg.data.test_size} px (max {cfg.data.max_size})"
        protocol += "; detector: ViTDet simple feature pyramid + Faster R-CNN (not SOLIDER's CSP head)"
        vit = model.backbone.vit
        backbone, prompt = vit.provenance(), vit.describe_prompt()
    else:
        protocol += f"; detections from {cfg.detections}"
        backbone, prompt = None, None
    record: dict[str, Any] = {
        "task": "detection",
        "dataset": cfg.dataset,
        "layout": LAYOUT,
        "protocol": protocol,
        "backbone": backbone,
        "prompt": prompt,
        "metrics": {f"MR-2 {name}": value for name, value in metrics.items()},
        "data": val.summary(),
    }
    if model is not None and training is not None:
        record["training"] = training.record(cfg.epochs)
        record["train_data"] = source["train"]
        record["history"] = training.history
        record["detections_file"] = DETECTIONS_FILE
        save_final_model(out, model)
    else:
        record["detections_file"] = source["detections"]
    table = [(f"MR^-2 {name} (%)", "n/a" if metrics[name] is None else pct(metrics[name])) for name in SETUPS]
    return write_results(out, cfg, record, title=f"Pedestrian detection: {cfg.dataset}", table=table)
