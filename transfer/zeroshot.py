"""``clasp zeroshot``: attributes by text from an exported backbone, through the labels' own CLIP text tower.

    clasp zeroshot --backbone runs/release/distill --prompts data_manifests/attributes_pa100k.yaml \\
        --data data/world/pa100k --out runs/zeroshot                  # PA-100K layout: label-based mA
    clasp zeroshot --backbone runs/release/distill --prompts my_attributes.yaml --images photos/ --out runs/zs

A backbone pre-trained with ``model.loss.distill=true`` carries a linear head (``distill_head.safetensors``)
from its class token under the *attribute* prompt to CLIP's image-embedding space. Any attribute given as
positive and negative prompts (the attribute-vocabulary YAML of ``clasp label --attributes``) is scored as
CLIP scores it: the mean text embedding of each prompt set over the templates, and P = the softmax of
the (positive, negative) pair of cosine logits, with exclusive ``group``s sharing one softmax as the labeler
does (``group_softmax``). The text tower is the CLIP that made the labels, named in the export's config.json
(arch, weights, weights id); a CLIP whose weights id differs is refused.

With ``--data`` (PA-100K layout, ``annotation.mat``) the attributes whose names match the dataset's are
evaluated on its test split with the trained attribute task's protocol (label-based mA, threshold 0.5,
``transfer.attributes.metrics``), beside two references on the same images: the CLIP itself, zero-shot
(``compare_clip``), and, with ``fit_corpus``, the same backbone read by a *post-hoc* linear map from its
class token to the stored CLIP embeddings (ridge regression on the label set's ``clip_embed``), which is
how a backbone pre-trained without the distillation term can be given text at all (``reference_backbone``).
With the CLIP row, each backbone reader also gets its mean cosine to the CLIP's embedding of the same image
and the share of attribute decisions it makes as the CLIP does: how much of the CLIP it reproduces, which
stays measurable when the CLIP's own mA is near chance. With ``--images`` the scores of every image are
written to ``scores.csv``.

What it cannot do: an attribute the CLIP itself cannot see (its zero-shot mA is the ceiling the head was
trained towards), fine spatial relations the class token does not keep, or words outside the CLIP's
vocabulary (the project's tiny CLIP knows only the synthetic world's captions).
"""

from __future__ import annotations

import csv
import json
import logging
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import POSITIVE, save_config, to_dict
from pipeline.errors import ClaspError
from pipeline.formats import write_json_atomic
from pipeline.vocab import DEFAULT_ATTRIBUTES, AttributeVocab, load_attributes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class ZeroShotConfig:
    backbone: str = ""  # export folder of a backbone pre-trained with model.loss.distill=true
    prompts: str = str(DEFAULT_ATTRIBUTES)  # attribute vocabulary YAML: name, positive, negative, group
    data: str | None = None  # PA-100K-layout folder (annotation.mat): evaluate on its split
    dataset: str = "pa100k"  # reader of transfer/attributes (its attribute names are matched by name)
    split: str = "test"  # the split evaluated (the trained attributes task reports on test)
    images: str | None = None  # or a folder of images: write their scores
    out: str = "runs/zeroshot"
    clip_checkpoint: str | None = None  # where the labels' CLIP is now, if not at the recorded path
    group_softmax: bool = True  # exclusive groups share one softmax (as the labeler)
    compare_clip: bool = True  # with data: also score the labels' CLIP itself on the same images
    # with data: also read the backbone through a linear map fitted post hoc to a label set's stored clip_embed
    fit_root: str | None = None  # data root of fit_corpus (None: data)
    fit_corpus: str | None = None  # corpus under fit_root whose label set stores clip_embed
    fit_labelset: str | None = None  # None: the latest complete label set of fit_corpus
    fit_images: Annotated[int, POSITIVE] = 2000  # corpus images used for that fit
    fit_ridge: float = 1.0  # ridge strength (on standardised features)
    # with fit_corpus: a second export (e.g. pre-trained without the distillation term, same seed), read the
    # same post-hoc way: how a backbone that never saw the CLIP embeddings does with text
    reference_backbone: str | None = None
    batch_size: Annotated[int, POSITIVE] = 64
    device: str = "auto"
    quiet: bool = False


@dataclass
class TextTower:
    """Positive/negative text embeddings of a vocabulary, the logit scale and the exclusive groups."""

    names: list[str]
    pos: torch.Tensor  # (A, E) unit vectors
    neg: torch.Tensor  # (A, E)
    logit_scale: float
    groups: list[list[int]]

    def probabilities(self, image_emb: torch.Tensor) -> torch.Tensor:
        """(N, E) image embeddings (any norm) -> (N, A) attribute probabilities."""
        image_emb = F.normalize(image_emb.float(), dim=-1)
        pos = self.logit_scale * image_emb @ self.pos.T
        neg = self.logit_scale * image_emb @ self.neg.T
        prob = torch.sigmoid(pos - neg)  # == softmax over the (positive, negative) pair
        for idx in self.groups:
            prob[:, idx] = pos[:, idx].softmax(-1)
        return prob


def load_labels_clip(info: dict[str, Any], clip_checkpoint: str | None, device: str) -> Any:
    """The CLIP named by an export's ``distill.clip`` (labelset.json "model"); refuses other weights."""
    from labeling.clip_model import load_clip

    clip = info.get("clip") or {}
    arch, weights, weights_id = clip.get("arch"), clip.get("weights"), clip.get("weights_id")
    if not arch or not weights_id:
        raise ClaspError("the export's config.json names no CLIP (distill.clip): re-export with this version")
    random = bool(clip.get("random"))
    if clip_checkpoint is not None:
        loaded = load_clip(arch, clip_checkpoint, allow_random_weights=random, device=device)
    elif weights and Path(weights).exists():
        loaded = load_clip(arch, weights, allow_random_weights=random, device=device)
    elif weights == weights_id:  # an open_clip tag (e.g. openai)
        loaded = load_clip(f"{arch}:{weights}", allow_random_weights=random, device=device)
    else:
        raise ClaspError(
            f"the labels' CLIP {arch} was loaded from {weights}, which is not here: pass --clip-checkpoint PATH "
            f"(the same weights, id {weights_id})"
        )
    if loaded.identity.weights_id != weights_id:
        raise ClaspError(
            f"CLIP {loaded.identity.weights} has weights id {loaded.identity.weights_id}, but the backbone was "
            f"distilled from {weights_id}: zero-shot needs the text tower of the CLIP that made the labels"
        )
    return loaded


def text_tower(loaded: Any, vocab: AttributeVocab, *, logit_scale: float, group_softmax: bool) -> TextTower:
    from labeling.clip_model import text_embeddings
    from labeling.labelers import exclusive_groups

    templates = list(vocab.templates)
    pos = text_embeddings(loaded, [list(a.positive) for a in vocab.attributes], templates).cpu()
    neg = text_embeddings(loaded, [list(a.negative) for a in vocab.attributes], templates).cpu()
    groups = exclusive_groups(vocab) if group_softmax else []
    return TextTower(vocab.names, pos, neg, logit_scale, groups)


class BackboneEmbedder:
    """Exported backbone + a linear map to CLIP's space: images -> (N, E) embeddings."""

    def __init__(self, path: str, head: nn.Linear | None, prompt: str | None, device: str) -> None:
        from pretrain.export import load_backbone

        self.model = load_backbone(path).to(device)
        config = json.loads((Path(path) / "config.json").read_text())
        self.img_size = tuple(config["img_size"])
        self.mean = torch.tensor(config["mean"], device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(config["std"], device=device).view(1, 3, 1, 1) * 255
        # a prompt only where there is a prompt-controlled MoE (a plain ViT export is a stock timm model)
        self.prompt = prompt if getattr(self.model, "has_moe", False) else None
        self.head, self.device = head, device

    @torch.no_grad()
    def class_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.device).float() - self.mean) / self.std
        tokens = self.model.forward_features(x, self.prompt) if self.prompt else self.model.forward_features(x)
        return tokens[:, 0].float()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.class_tokens(images)).cpu()


class ClipEmbedder:
    """The labels' CLIP image tower at the labels' resolution: images -> (N, E), as ``clasp label`` embeds them."""

    def __init__(self, loaded: Any, resolution: tuple[int, int], device: str) -> None:
        from labeling.clip_model import DenseClip

        self.dense = DenseClip(loaded.model, resolution).to(device).eval()
        self.img_size = tuple(resolution)
        self.mean = torch.tensor(loaded.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(loaded.std, device=device).view(1, 3, 1, 1) * 255
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.dense((images.to(self.device).float() - self.mean) / self.std)[0].cpu()


def embed_files(embed: Any, paths: list[str], batch_size: int, *, quiet: bool, what: str) -> torch.Tensor:
    """Decode (straight resize, as the labeler) and embed image files in batches; (N, E)."""
    from labeling.image_shards import decode_image
    from pipeline.progress import progress

    out = []
    with progress(len(paths), what, quiet=quiet) as advance:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            images = []
            for p in chunk:
                try:
                    images.append(decode_image(Path(p).read_bytes(), embed.img_size))
                except OSError as exc:
                    raise ClaspError(f"cannot read image {p}: {exc}") from None
            out.append(embed(torch.stack(images)))
            advance(len(chunk))
    return torch.cat(out) if out else torch.zeros(0)


def fit_linear_map(
    embedder: BackboneEmbedder, root: str, corpus: str, labelset: str | None, *, limit: int, ridge: float
) -> tuple[nn.Linear, dict[str, Any]]:
    """Ridge regression from class tokens to the stored ``clip_embed`` of the first ``limit`` corpus images."""
    import pyarrow.parquet as pq

    from labeling.image_shards import decode_image
    from pipeline import formats

    try:
        labelset = labelset or formats.latest_labelset(root, corpus)
        sizes = formats.read_sizes(root, corpus)
    except FileNotFoundError as exc:
        raise ClaspError(str(exc)) from None
    feats, targets, n = [], [], 0
    for name in sizes:
        if n >= limit:
            break
        index = formats.shard_index(name)
        label_path = formats.label_shard_path(root, corpus, labelset, index)
        if "clip_embed" not in pq.read_schema(label_path).names:
            raise ClaspError(
                f"{label_path} has no clip_embed column: fit_labelset must be labelled with --store-embeddings"
            )
        rows = pq.read_table(label_path, columns=["key", "clip_embed"]).to_pylist()
        embeds = {r["key"]: r["clip_embed"] for r in rows}
        images, keys = [], []
        with tarfile.open(formats.image_shard_path(root, corpus, index)) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                if ext.lower() not in ("jpg", "jpeg", "png", "webp") or n + len(images) >= limit:
                    continue
                images.append(decode_image(tar.extractfile(member).read(), embedder.img_size))
                keys.append(key)
        for start in range(0, len(images), 64):
            feats.append(embedder.class_tokens(torch.stack(images[start : start + 64])).cpu())
        targets += [np.frombuffer(embeds[k], "<f2").astype(np.float32) for k in keys]
        n += len(keys)
    x = torch.cat(feats).double()
    y = torch.from_numpy(np.stack(targets)).double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    w = torch.linalg.solve(xs.T @ xs + ridge * len(xs) * torch.eye(xs.shape[1], dtype=xs.dtype), xs.T @ (y - y.mean(0)))
    head = nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():
        head.weight.copy_((w / sd[:, None]).T.float())
        head.bias.copy_((y.mean(0) - (mu / sd) @ w).float())
    fit_cos = F.cosine_similarity(head(x.float()), y.float(), dim=-1).mean().item()
    return head, {"labelset": labelset, "images": n, "ridge": ridge, "train_cosine": round(fit_cos, 4)}


def _score_readers(
    cfg: ZeroShotConfig,
    readers: dict[str, tuple[Any, str]],
    tower: Any,
    paths: list,
    gt: Any,
    shared: list[str],
    cols_prompt: list[int],
) -> dict[str, dict]:
    """Each reader's attribute metrics on ``paths``; with the CLIP among them, each one's agreement with it."""
    from transfer.attributes import metrics as attr_metrics

    results, embeds = {}, {}
    for title, (embedder, key) in readers.items():
        embeds[key] = emb = embed_files(embedder, paths, cfg.batch_size, quiet=cfg.quiet, what=key)
        prob = tower.probabilities(emb)[:, cols_prompt].numpy()
        scores = attr_metrics.attribute_metrics(gt, prob)
        results[key] = {
            "reader": title,
            "mA": round(100 * float(scores["mA"]), 2),
            **{k: round(100 * float(scores[k]), 2) for k in ("accuracy", "precision", "recall", "f1")},
            "per_attribute_mA": {n: round(100 * float(v), 2) for n, v in zip(shared, scores["label_mA"], strict=True)},
        }
    if "clip" in embeds:  # how much of the CLIP's own zero-shot behaviour each backbone reader reproduces
        clip_decisions = tower.probabilities(embeds["clip"])[:, cols_prompt] > 0.5
        for key, emb in embeds.items():
            decisions = tower.probabilities(emb)[:, cols_prompt] > 0.5
            cosine = F.cosine_similarity(emb.float(), embeds["clip"].float(), dim=-1).mean()
            results[key]["cosine_to_clip"] = round(float(cosine), 4)
            results[key]["agreement_with_clip"] = round(100 * float((decisions == clip_decisions).float().mean()), 2)
    return results


def run_zeroshot(cfg: ZeroShotConfig) -> dict[str, Any]:
    """Score attributes by text; evaluate on ``cfg.data`` or write ``cfg.images``' scores. Returns the record."""
    from pipeline.guards import resolve_device
    from pretrain.export import load_distill_head

    if not cfg.backbone:
        raise ClaspError("clasp zeroshot: give --backbone, an export folder")
    if (cfg.data is None) == (cfg.images is None):
        raise ClaspError("clasp zeroshot: give exactly one of --data (a PA-100K-layout folder) or --images (a folder)")
    if cfg.reference_backbone and not cfg.fit_corpus:
        raise ClaspError("reference_backbone is read through a post-hoc linear map: set fit_corpus (and fit_root)")
    device = resolve_device(cfg.device)
    try:
        vocab = load_attributes(cfg.prompts)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ClaspError(f"--prompts {cfg.prompts}: {exc}") from None
    head, info = load_distill_head(cfg.backbone)
    loaded = load_labels_clip(info, cfg.clip_checkpoint, device)
    scale = float(info["clip"].get("logit_scale") or loaded.model.logit_scale.detach().exp().clamp(max=100.0))
    tower = text_tower(loaded, vocab, logit_scale=scale, group_softmax=cfg.group_softmax)
    if tower.pos.shape[1] != head.out_features:
        raise ClaspError(f"the export's head gives {head.out_features}-d embeddings, the CLIP {tower.pos.shape[1]}-d")
    distilled = BackboneEmbedder(cfg.backbone, head.to(device), info.get("prompt"), device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    t0 = time.perf_counter()
    if cfg.images is not None:
        return _score_folder(cfg, distilled, tower, out)

    from transfer.attributes import metrics as attr_metrics
    from transfer.attributes.datasets import load_attr_dataset

    data = load_attr_dataset(cfg.dataset, cfg.data)
    paths, labels = data.split(cfg.split)
    shared = [n for n in tower.names if n in data.attr_names]
    if not shared:
        raise ClaspError(
            f"--prompts {cfg.prompts} names none of {data.name}'s attributes ({', '.join(data.attr_names[:5])}, ...): "
            "name each attribute as the dataset does"
        )
    cols_prompt = [tower.names.index(n) for n in shared]
    gt = labels[:, [data.attr_names.index(n) for n in shared]]
    readers: dict[str, tuple[Any, str]] = {"backbone (distilled head)": (distilled, "backbone")}
    if cfg.compare_clip:
        resolution = tuple(info["clip"].get("resolution") or loaded.model.visual.image_size)
        readers["CLIP of the labels"] = (ClipEmbedder(loaded, resolution, device), "clip")
    fits = {}
    posthoc = {"backbone_posthoc": ("backbone (post-hoc linear map)", cfg.backbone)}
    if cfg.reference_backbone:
        posthoc["reference_posthoc"] = (
            f"reference {cfg.reference_backbone} (post-hoc linear map)",
            cfg.reference_backbone,
        )
    for key, (title, path) in posthoc.items() if cfg.fit_corpus else ():
        reader = BackboneEmbedder(path, None, info.get("prompt"), device)
        reader.head, fits[key] = fit_linear_map(
            reader, cfg.fit_root or "data", cfg.fit_corpus, cfg.fit_labelset, limit=cfg.fit_images, ridge=cfg.fit_ridge
        )
        readers[title] = (reader, key)
    results = _score_readers(cfg, readers, tower, paths, gt, shared, cols_prompt)
    record = {
        "task": "zeroshot-attributes",
        "dataset": data.name,
        "split": cfg.split,
        "images": len(paths),
        "attributes": shared,
        "protocol": attr_metrics.PROTOCOL + "; probabilities from text prompts, no training on the dataset",
        "backbone": str(cfg.backbone),
        "prompt": info.get("prompt"),
        "clip": info["clip"],
        "posthoc_fits": fits,
        "results": results,
        "wall_s": round(time.perf_counter() - t0, 1),
        "config": to_dict(cfg),
    }
    write_json_atomic(out / "results.json", record)
    (out / "results.md").write_text(_table(record))
    return record


def _score_folder(cfg: ZeroShotConfig, embed: BackboneEmbedder, tower: TextTower, out: Path) -> dict[str, Any]:
    folder = Path(cfg.images)
    if not folder.is_dir():
        raise ClaspError(f"--images {folder} is not a folder")
    paths = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ClaspError(f"--images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    prob = tower.probabilities(embed_files(embed, paths, cfg.batch_size, quiet=cfg.quiet, what="zeroshot")).numpy()
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", *tower.names])
        for path, row in zip(paths, prob, strict=True):
            writer.writerow([str(Path(path).relative_to(folder)), *(f"{v:.4f}" for v in row)])
    record = {"task": "zeroshot-attributes", "images": len(paths), "attributes": tower.names, "scores": "scores.csv"}
    write_json_atomic(out / "results.json", record)
    return record


def _table(record: dict[str, Any]) -> str:
    lines = [
        f"# Zero-shot attributes by text: {record['dataset']} {record['split']} ({record['images']} images, "
        f"{len(record['attributes'])} attributes)",
        "",
        f"Protocol: {record['protocol']}.",
        "",
        "| reader | mA | Acc | Prec | Rec | F1 | cosine to CLIP's embedding | decisions as CLIP's (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in record["results"].values():
        lines.append(
            f"| {row['reader']} | {row['mA']:.2f} | {row['accuracy']:.2f} | {row['precision']:.2f} | "
            f"{row['recall']:.2f} | {row['f1']:.2f} | {row.get('cosine_to_clip', '-')} | "
            f"{row.get('agreement_with_clip', '-')} |"
        )
    return "\n".join(lines) + "\n"
