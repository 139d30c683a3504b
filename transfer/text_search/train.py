"""Text-to-person retrieval (text-based person search): fine-tune the backbone as the image tower of a CLIP.

    clasp transfer text-search --data data/CUHK-PEDES --dataset cuhk-pedes --backbone runs/release/demo \
        --out runs/text-cuhk --config configs/transfer/text_search_cuhk_pedes.yaml
    clasp transfer text-search --data runs/demo/world/cuhk_pedes --dataset cuhk-pedes --backbone runs/release/demo \
        --out runs/text-synth --config configs/transfer/text_search_synthetic.yaml text.checkpoint=runs/demo/clip
    accelerate launch --num_processes 4 .venv/bin/clasp transfer text-search ...      # several GPUs

Recipe (IRRA, CVPR 2023, without its masked-language cross-modal branch): training items are (image, caption)
pairs, one per caption, in random batches; loss = SDM (identity-aware KL matching, ``losses.sdm_loss``) at
temperature 0.02 + an identity classifier on both embeddings; Adam, warmup + cosine; flip, pad + crop, random
erasing. Test: every caption of the test split queries all test images by cosine similarity; R@1/5/10, mAP and
mINP exactly as IRRA's ``rank`` (``metrics.evaluate_t2i``). The run resumes from ``out/checkpoint.pt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE
from pipeline.errors import ClaspError
from transfer.backbone import BackboneConfig, FeatureBackbone, build_backbone
from transfer.data import BatchConfig, ImageDataset
from transfer.loop import FineTuneResult, LossFn, Training, predict_in_order, prepare_training
from transfer.optim import OptimConfig
from transfer.results import save_final_model, write_results
from transfer.task import FineTuneConfig, FineTuneTask
from transfer.text_search import metrics
from transfer.text_search.datasets import TextSearchData, load_text_search_dataset
from transfer.text_search.losses import id_loss, sdm_loss
from transfer.text_search.model import TextSearchModel, TextTowerConfig, build_text_tower


@dataclass
class TextDataConfig(BatchConfig):
    img_size: Annotated[tuple[int, int], POSITIVE] = (384, 128)  # (height, width), IRRA
    batch_size: Annotated[int, POSITIVE] = 128  # (image, caption) pairs per process
    flip_prob: float = 0.5
    padding_px: int = 10
    erasing_prob: float = 0.5


@dataclass
class TextLossConfig:
    temperature: Annotated[float, POSITIVE] = 0.02  # SDM logit scale = 1 / temperature (IRRA)
    sdm_weight: float = 1.0
    id_weight: Annotated[float, NON_NEGATIVE] = 1.0  # 0 = no identity classifier


@dataclass
class TextEvalConfig:
    split: Literal["test", "val"] = "test"
    batch_size: Annotated[int, POSITIVE] = 256


@dataclass
class TextSearchConfig(FineTuneConfig):
    dataset: str = "cuhk-pedes"
    backbone: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(prompt="learned", prompt_mix={"instance": 0.5, "attribute": 0.5})
    )
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            name="adam", lr=1e-5, weight_decay=4e-5, warmup_epochs=5, warmup_lr_factor=0.1, min_lr_factor=0.0
        )
    )
    loss: TextLossConfig = field(default_factory=TextLossConfig)
    eval: TextEvalConfig = field(default_factory=TextEvalConfig)
    epochs: Annotated[int, AT_LEAST_ONE] = 60


def transforms(backbone: FeatureBackbone, cfg: TextDataConfig, *, train: bool) -> Any:
    """The re-ID transforms, with IRRA's erasing: torchvision's, filling with 0 (the mean after Normalize)."""
    import torchvision.transforms as T

    from transfer.reid.identity import transforms as identity_transforms

    erasing = lambda p: T.RandomErasing(p=p, scale=(0.02, 0.4), value=0)  # noqa: E731
    return identity_transforms(backbone, cfg, train=train, erasing=erasing)


class TextSearchTask(FineTuneTask[TextSearchConfig, TextSearchData]):
    name = "text-search"
    config = TextSearchConfig
    data_hint = "CUHK-PEDES / ICFG-PEDES / RSTPReid folder"

    def load_data(self, cfg: TextSearchConfig) -> TextSearchData:
        data = load_text_search_dataset(cfg.dataset, cfg.data_dir)
        if cfg.eval.split not in data.splits:
            raise ClaspError(
                f"{data.layout} has no '{cfg.eval.split}' split; set eval.split to one of {list(data.splits)}"
            )
        return data

    def build_model(self, cfg: TextSearchConfig, data: TextSearchData) -> TextSearchModel:
        text, self.tokenizer, self.text_identity = build_text_tower(cfg.text)
        backbone = build_backbone(cfg.backbone, tuple(cfg.data.img_size))
        return TextSearchModel(backbone, text, data.num_train_ids, id_head=cfg.loss.id_weight > 0)

    def prepare(
        self, cfg: TextSearchConfig, data: TextSearchData, model: TextSearchModel, accelerator: Any
    ) -> Training:
        tokens = self.tokenizer([caption for _, _, caption in data.train])
        targets = [(pid, tokens[i]) for i, (_, pid, _) in enumerate(data.train)]
        train_set = ImageDataset(
            [p for p, _, _ in data.train], targets, transforms(model.backbone, cfg.data, train=True)
        )
        return prepare_training(accelerator, cfg, cfg.data, model, train_set, seed=cfg.seed, quiet=cfg.quiet)

    def loss_fn(self, cfg: TextSearchConfig, data: TextSearchData, accelerator: Any) -> LossFn:
        def loss_fn(net: torch.nn.Module, images: torch.Tensor, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            pids, caption_tokens = batch
            out = net(images, caption_tokens)
            losses = {"sdm": sdm_loss(out["image"], out["text"], pids, logit_scale=1.0 / cfg.loss.temperature)}
            total = cfg.loss.sdm_weight * losses["sdm"]
            if cfg.loss.id_weight > 0:
                losses["id"] = id_loss(out["image_logits"].float(), out["text_logits"].float(), pids)
                total = total + cfg.loss.id_weight * losses["id"]
            return {"loss": total, **losses}

        return loss_fn

    def evaluate(
        self, cfg: TextSearchConfig, data: TextSearchData, model: TextSearchModel, accelerator: Any
    ) -> dict[str, float]:
        return evaluate(model, data, cfg, self.tokenizer, accelerator)

    def write(
        self,
        out: Path,
        cfg: TextSearchConfig,
        data: TextSearchData,
        model: TextSearchModel,
        scores: Any,
        training: FineTuneResult,
    ) -> dict[str, Any]:
        return _write(out, cfg, data, model, scores, training, self.text_identity)


run = TextSearchTask().run


@torch.no_grad()
def evaluate(
    model: TextSearchModel, data: TextSearchData, cfg: TextSearchConfig, tokenizer: Any, accelerator: Any
) -> dict[str, float]:
    """Every caption of the evaluation split against all of its images (``metrics.evaluate_t2i``)."""
    split = data.splits[cfg.eval.split]
    model.eval()
    transform = transforms(model.backbone, cfg.data, train=False)
    images = ImageDataset([p for p, _ in split.images], [0] * len(split.images), transform)
    gallery = predict_in_order(
        accelerator, model.encode_image, images, batch_size=cfg.eval.batch_size, workers=cfg.data.workers
    )
    tokens = tokenizer([caption for caption, _ in split.captions])
    queries = torch.cat(
        [
            model.encode_text(tokens[i : i + cfg.eval.batch_size].to(accelerator.device)).float().cpu()
            for i in range(0, len(tokens), cfg.eval.batch_size)
        ]
    )
    similarity = F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).t()
    query_pids = np.array([pid for _, pid in split.captions])
    gallery_pids = np.array([pid for _, pid in split.images])
    return metrics.evaluate_t2i(similarity.numpy(), query_pids, gallery_pids)


def _write(
    out: Path,
    cfg: TextSearchConfig,
    data: TextSearchData,
    model: TextSearchModel,
    scores: dict[str, float],
    training: FineTuneResult,
    text_identity: dict[str, Any],
) -> dict[str, Any]:
    h, w = cfg.data.img_size
    split = data.splits[cfg.eval.split]
    protocol = (
        f"{metrics.PROTOCOL}; {cfg.eval.split} split: {len(split.captions)} caption queries x {len(split.images)} "
        f"images; input {h}x{w}"
    )
    table = [(name, f"{scores[name]:.2f}") for name in ("R1", "R5", "R10", "mAP", "mINP")]
    record = {
        "task": "text-search",
        "dataset": data.name,
        "layout": data.layout,
        "protocol": protocol,
        "backbone": model.backbone.provenance(),
        "prompt": model.backbone.describe_prompt(),
        "text_tower": text_identity,
        "metrics": scores,
        "data": data.summary(),
        "training": training.record(cfg.epochs),
        "history": training.history,
    }
    save_final_model(out, model)
    return write_results(out, cfg, record, title=f"Text-to-person retrieval: {data.name}", table=table)
