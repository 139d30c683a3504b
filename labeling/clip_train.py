"""``clasp clip-train``: train or fine-tune an open_clip model on image-caption pairs.

    clasp clip-train --pairs data/synthetic-world/pairs.csv --arch clasp-vit-tiny-8 --out runs/clip
    clasp clip-train --pairs captions/ --arch ViT-B-16 --init ViT-B-16:openai --out runs/clip-person

Two uses: adapting a CLIP to person images with captions (LUPerson-MLLM style), and the offline
default, a small CLIP trained on the synthetic world's captions in a few CPU minutes so the demo
labels with a CLIP that means something. open_clip's own model classes and ClipLoss do the work.

``--pairs`` is a CSV or Parquet file with ``image`` and ``caption`` columns (image paths relative
to the file's folder, or absolute), or a folder of such files. An optional ``box`` column
(``"x0 y0 x1 y1"`` in pixels, empty for the whole image) makes a row a region-caption pair: the
image is cropped to the box first (the synthetic world writes body-part and background regions
this way, so the patch tokens that dense part labels read learn the part words). The output folder is open_clip's
``local-dir`` layout: ``open_clip_model.safetensors`` + ``open_clip_config.json`` (so
``open_clip.create_model("local-dir:OUT")`` and ``create_model(arch, pretrained=OUT/open_clip_model.safetensors)``
both load it, and ``clasp label --clip-checkpoint OUT`` uses it), plus the resolved config and a
training log. An interrupted run resumes from ``train_state.pt`` at the last finished epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from open_clip.loss import ClipLoss
from PIL import Image
from safetensors.torch import save_file

from labeling.clip_model import OPEN_CLIP_CONFIG, file_sha256, load_clip, parse_clip_spec
from pipeline.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, ConfigError, save_config, to_dict
from pipeline.errors import ClaspError
from pipeline.formats import atomic_path, write_json_atomic
from pipeline.guards import resolve_device
from pipeline.safe_load import load_plain_state

WEIGHTS_FILE = "open_clip_model.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "clip_train_config.yaml"


@dataclass
class ClipTrainConfig:
    pairs: str = ""  # CSV/Parquet with image,caption columns, or a folder of them
    arch: str = "clasp-vit-tiny-8"  # open_clip architecture (labeling/model_configs/ adds the tiny default)
    init: str | None = None  # ARCH:TAG or a checkpoint (file or local-dir folder) to fine-tune; None = from scratch
    out: str = "runs/clip"
    epochs: Annotated[int, AT_LEAST_ONE] = 10
    batch_size: Annotated[int, POSITIVE] = 128
    lr: Annotated[float, POSITIVE] = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    hflip: bool = True  # captions say nothing about left/right, so flipping is label-preserving
    crop_scale: float = 0.85  # random crops keep at least this share of each side
    # Chance that a caption is replaced by a random subset of its phrases ("a woman", "a pink skirt", ...):
    # teaches the text tower phrases on their own, the form of the labeler's prompts, instead of whole captions.
    caption_phrases: float = 0.5
    time_limit_s: float | None = None  # stop early (after the running step) and save; None = all epochs
    workers: Annotated[int, NON_NEGATIVE] = 2
    seed: int = 0
    device: str = "auto"
    quiet: bool = False


Box = tuple[int, int, int, int]


def _parse_box(value: object, where: str) -> Box | None:
    """``"x0 y0 x1 y1"`` (pixels, x1 > x0, y1 > y0) or empty/null for the whole image."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        box = tuple(int(round(float(v))) for v in str(value).replace(",", " ").split())
    except ValueError:
        box = ()
    if len(box) != 4 or box[0] < 0 or box[1] < 0 or box[2] <= box[0] or box[3] <= box[1]:
        raise ClaspError(f"{where}: box '{value}' is not 'x0 y0 x1 y1' with x1 > x0 >= 0 and y1 > y0 >= 0")
    return box  # type: ignore[return-value]


def _pairs_files(path: Path) -> list[Path]:
    """``path`` itself, or the .csv/.parquet files of the folder ``path`` in name order."""
    if not path.exists():
        raise ClaspError(f"--pairs {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix in (".csv", ".parquet")) if path.is_dir() else [path]
    if not files:
        raise ClaspError(f"--pairs {path}: folder holds no .csv or .parquet files")
    return files


def read_pairs(path: str | Path) -> tuple[list[Path], list[str], list[Box | None]]:
    """(image paths, captions, boxes) from one CSV/Parquet file or every such file in a folder."""
    path = Path(path)
    images, captions, boxes = [], [], []
    for f in _pairs_files(path):
        if f.suffix == ".parquet":
            table = pq.read_table(f)
        elif f.suffix == ".csv":
            types = {"image": pa.string(), "box": pa.string()}
            table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(column_types=types))
        else:
            raise ClaspError(f"--pairs {f}: expected a .csv or .parquet file")
        missing = {"image", "caption"} - set(table.column_names)
        if missing:
            raise ClaspError(f"{f}: missing column(s) {sorted(missing)}; found {table.column_names}")
        box_col = table.column("box").to_pylist() if "box" in table.column_names else [None] * table.num_rows
        rows = zip(table.column("image").to_pylist(), table.column("caption").to_pylist(), box_col, strict=True)
        for n, (img, cap, box) in enumerate(rows):
            if img is None or not cap:
                raise ClaspError(f"{f}: a row has an empty image or caption")
            p = Path(img)
            images.append(p if p.is_absolute() else f.parent / p)
            captions.append(str(cap))
            boxes.append(_parse_box(box, f"{f} row {n + 1}"))
    if not images:
        raise ClaspError(f"--pairs {path}: no pairs found")
    absent = [str(p) for p in images[:1000] if not p.is_file()]
    if absent:
        raise ClaspError(f"--pairs {path}: image {absent[0]} does not exist ({len(absent)} of the first 1000 missing)")
    return images, captions, boxes


_PHRASE_SPLIT = re.compile(r",\s*|\s+and\s+|\s+(?=with\s|wearing\s|carrying\s)|^(?:with|wearing|carrying)\s+")


def caption_phrases(caption: str) -> list[str]:
    """Split a caption at commas, 'and', 'with', 'wearing', 'carrying' into its noun phrases."""
    parts = [p.strip() for p in _PHRASE_SPLIT.split(caption)]
    return [re.sub(r"^(?:with|wearing|carrying)\s+", "", p) for p in parts if p]


def sample_caption(caption: str, rng: np.random.Generator, p: float) -> str:
    """The caption, or with probability ``p`` a random non-empty subset of its phrases (in order)."""
    if p <= 0 or rng.random() >= p:
        return caption
    phrases = caption_phrases(caption)
    keep = rng.random(len(phrases)) < 0.5
    if not keep.any():
        keep[rng.integers(len(phrases))] = True
    return ", ".join(ph for ph, k in zip(phrases, keep, strict=True) if k)


class PairImages(torch.utils.data.Dataset):
    """Image i (or its box) resized with a mild random crop and flip to the CLIP input size, uint8 (3, H, W)."""

    def __init__(
        self, images: list[Path], size: tuple[int, int], cfg: ClipTrainConfig, boxes: list[Box | None] | None = None
    ) -> None:
        self.images, self.size, self.cfg = images, size, cfg
        self.boxes = boxes if boxes is not None else [None] * len(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        rng = np.random.default_rng((self.cfg.seed, i, torch.initial_seed() % (1 << 31)))
        with Image.open(self.images[i]) as img:
            img = img.convert("RGB")
            bx0, by0, bx1, by1 = self.boxes[i] or (0, 0, *img.size)
            if bx1 > img.size[0] or by1 > img.size[1]:
                raise ClaspError(
                    f"{self.images[i]}: box {self.boxes[i]} lies outside the {img.size[0]}x{img.size[1]} image"
                )
            w, h = bx1 - bx0, by1 - by0
            sw, sh = rng.uniform(self.cfg.crop_scale, 1.0, size=2)
            cw, ch = max(1, round(w * sw)), max(1, round(h * sh))
            x0, y0 = bx0 + int(rng.integers(0, w - cw + 1)), by0 + int(rng.integers(0, h - ch + 1))
            img = img.resize((self.size[1], self.size[0]), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
            if self.cfg.hflip and rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            arr = np.asarray(img, dtype=np.uint8).copy()
        return i, torch.from_numpy(arr).permute(2, 0, 1)


def _build_model(cfg: ClipTrainConfig, device: str) -> tuple[torch.nn.Module, object, dict, dict]:
    """(model, tokenizer, model_cfg, preprocess_cfg) from ``init`` or a fresh ``arch``."""
    if cfg.init:
        ckpt = Path(cfg.init)
        if ckpt.exists():
            loaded = load_clip(cfg.arch, ckpt, allow_random_weights=True, device=device)
            cfg_dir = ckpt if ckpt.is_dir() else ckpt.parent
            model_cfg = (
                json.loads((cfg_dir / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
                if (cfg_dir / OPEN_CLIP_CONFIG).is_file()
                else open_clip.get_model_config(cfg.arch)
            )
        else:
            arch, tag = parse_clip_spec(cfg.init)
            if tag is None:
                raise ConfigError(f"init '{cfg.init}' is neither an existing checkpoint path nor ARCH:TAG")
            loaded = load_clip(cfg.init, None, device=device)
            model_cfg = open_clip.get_model_config(arch)
        model, tokenizer = loaded.model, loaded.tokenizer
        mean, std = loaded.mean, loaded.std
    else:
        model_cfg = open_clip.get_model_config(cfg.arch)
        if model_cfg is None:
            raise ConfigError(f"arch '{cfg.arch}' is not an open_clip architecture (see open_clip.list_models())")
        model = open_clip.create_model(cfg.arch, device=device)
        tokenizer = open_clip.get_tokenizer(cfg.arch)
        mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    size = tuple(int(s) for s in model.visual.image_size)
    preprocess_cfg = {"size": list(size), "mean": list(mean), "std": list(std), "resize_mode": "squash"}
    return model.to(device).train(), tokenizer, model_cfg, preprocess_cfg


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # gains, biases, embeddings tables and the temperature are not decayed (as in CLIP training)
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_clip(cfg: ClipTrainConfig) -> Path:
    """Train on ``cfg.pairs``; returns the path of the weights file written under ``cfg.out``."""
    if not cfg.pairs:
        raise ConfigError("clip-train needs --pairs FILE|DIR (a CSV/Parquet of image,caption rows)")
    out = Path(cfg.out)
    digest = _pairs_digest(cfg.pairs)
    finished = _finished_run(out, cfg, digest)
    if finished is not None:  # the same config on the same pairs already ran to the end: nothing to do
        if not cfg.quiet:
            print(f"clip-train: {finished} is already trained with this config on these pairs; reusing it")
        return finished
    device = resolve_device(cfg.device)  # refuse a missing GPU before creating anything
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    images, captions, boxes = read_pairs(cfg.pairs)
    model, tokenizer, model_cfg, preprocess_cfg = _build_model(cfg, device)
    text_rng = np.random.default_rng(cfg.seed)
    size = tuple(preprocess_cfg["size"])
    mean = torch.tensor(preprocess_cfg["mean"], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(preprocess_cfg["std"], device=device).view(1, 3, 1, 1) * 255

    batch = min(cfg.batch_size, len(images))
    steps_per_epoch = max(1, len(images) // batch)
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    start_epoch, history = _maybe_resume(out, cfg, model, optimizer)
    save_config(cfg, out / CONFIG_FILE)

    loader = torch.utils.data.DataLoader(
        PairImages(images, size, cfg, boxes),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=cfg.workers > 0,
    )
    use_bf16 = device.startswith("cuda")
    t0 = time.perf_counter()
    stopped = False
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed + epoch)  # the shuffle of epoch e is the same after a resume
        loader.generator.manual_seed(cfg.seed + epoch)
        losses = []
        for ids, imgs in loader:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total_steps, cfg)
            x = (imgs.to(device, non_blocking=True).float() - mean) / std
            texts = [sample_caption(captions[i], text_rng, cfg.caption_phrases) for i in ids.tolist()]
            losses.append(_step(model, optimizer, loss_fn, x, tokenizer(texts).to(device), step, cfg.lr, use_bf16))
            step += 1
            if cfg.time_limit_s is not None and time.perf_counter() - t0 > cfg.time_limit_s:
                stopped = True
                break
        history.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(losses)) if losses else None,
                "steps": step,
                "logit_scale": float(model.logit_scale.detach().exp()),
                "elapsed_s": time.perf_counter() - t0,
            }
        )
        if not cfg.quiet:
            print(
                f"clip-train epoch {epoch + 1}/{cfg.epochs}: loss {history[-1]['loss']:.4f} "
                f"({step} steps, {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        if stopped:
            break
        _save_state(out, model, optimizer, epoch + 1, history)

    return _write_outputs(out, cfg, model, model_cfg, preprocess_cfg, len(images), digest, history, stopped)


def _pairs_digest(pairs: str) -> str:
    """sha256 over the pairs file(s) (names and bytes), so a rerun on edited captions is not mistaken for done."""
    files = _pairs_files(Path(pairs))
    return hashlib.sha256(" ".join(f"{f.name}:{file_sha256(f, 64)}" for f in files).encode()).hexdigest()


def _finished_run(out: Path, cfg: ClipTrainConfig, digest: str) -> Path | None:
    """The weights of a complete earlier run in ``out`` with the same config and pairs, else None."""
    log_path, weights = out / "train_log.json", out / WEIGHTS_FILE
    if not (log_path.is_file() and weights.is_file()) or (out / STATE_FILE).exists():
        return None
    try:
        log = json.loads(log_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = log.get("config") == json.loads(json.dumps(to_dict(cfg))) and log.get("pairs_sha256") == digest
    return weights if same and not log.get("stopped_by_time_limit") else None


def _lr_at(step: int, total: int, cfg: ClipTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int, history: list) -> None:
    with atomic_path(out / STATE_FILE) as tmp:
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history}, tmp
        )


def _maybe_resume(
    out: Path, cfg: ClipTrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, list]:
    state_path = out / STATE_FILE
    if not state_path.is_file():
        return 0, []
    saved_cfg = out / CONFIG_FILE
    if saved_cfg.is_file():
        import yaml

        if yaml.safe_load(saved_cfg.read_text()) != to_dict(cfg):
            raise ClaspError(
                f"{out} holds an unfinished run with a different config ({saved_cfg}); use another --out "
                f"or delete {state_path} to start over"
            )
    state = load_plain_state(state_path, what="clip-train resume state")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), list(state["history"])


def _step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: ClipLoss,
    x: torch.Tensor,
    tokens: torch.Tensor,
    step: int,
    lr: float,
    use_bf16: bool,
) -> float:
    """One optimizer step on an image-caption batch; returns its loss (a non-finite loss stops the run)."""
    with torch.autocast(device_type="cuda" if use_bf16 else "cpu", dtype=torch.bfloat16, enabled=use_bf16):
        img_f, txt_f, scale = model(x, tokens)[:3]
        loss = loss_fn(img_f, txt_f, scale)
    if not torch.isfinite(loss):
        raise ClaspError(f"clip-train: loss became {loss.item()} at step {step}; lower --lr (now {lr})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # CLIP's clamp: temperature at most 100
        model.logit_scale.clamp_(0, math.log(100))
    return loss.item()


def _write_outputs(
    out: Path,
    cfg: ClipTrainConfig,
    model: torch.nn.Module,
    model_cfg: dict,
    preprocess_cfg: dict,
    num_pairs: int,
    digest: str,
    history: list[dict],
    stopped: bool,
) -> Path:
    """The weights, the open_clip config beside them and the training log; the resume state goes."""
    weights = out / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json_atomic(
        out / OPEN_CLIP_CONFIG, {"arch": cfg.arch, "model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    )
    write_json_atomic(
        out / "train_log.json",
        {
            "config": to_dict(cfg),
            "pairs": num_pairs,
            "pairs_sha256": digest,
            "epochs": history,
            "stopped_by_time_limit": stopped,
        },
    )
    (out / STATE_FILE).unlink(missing_ok=True)
    return weights
