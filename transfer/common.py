"""What every transfer task shares: the task registry, optimiser + warmup/cosine schedule, the image
dataset, resumable checkpoints, progress display, and results written as JSON + Markdown.

Task contract (so pose, detection, person search and parsing slot in as further names): a task
module listed in ``TASKS`` defines ``CONFIG`` (a dataclass with at least ``data_dir``, ``dataset``,
``out_dir``, ``quiet`` and ``backbone: BackboneConfig``) and ``run(cfg) -> dict`` returning the
results record it wrote to ``out_dir/results.json``.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from torch import nn

from pipeline.config import NON_NEGATIVE, POSITIVE, save_config, to_dict
from pipeline.errors import ClaspError
from pipeline.formats import atomic_path, write_json_atomic
from pipeline.progress import progress  # noqa: F401 - the tasks' progress display
from pipeline.safe_load import load_plain_state
from transfer.backbone import FeatureBackbone, layer_lr_scales

log = logging.getLogger(__name__)

TASKS: dict[str, str] = {
    "reid": "transfer.reid.train",
    "attributes": "transfer.attributes.train",
    "pose": "transfer.pose.train",
    "detection": "transfer.detection.train",
    "person-search": "transfer.person_search.train",
    "parsing": "transfer.parsing.train",
    "text-search": "transfer.text_search.train",
    "frozen": "transfer.frozen",  # no training: retrieval mAP / closed-form attribute read-out of frozen features
}
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
CHECKPOINT = "checkpoint.pt"


def task_entry(name: str) -> tuple[type, Callable[[Any], dict[str, Any]]]:
    """(config class, run function) of transfer task ``name``."""
    if name not in TASKS:
        raise ClaspError(f"unknown transfer task '{name}': choose one of {', '.join(TASKS)}")
    module = importlib.import_module(TASKS[name])
    return module.CONFIG, module.run


# --- optimisation ---------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: Annotated[float, POSITIVE] = 0.008
    weight_decay: Annotated[float, NON_NEGATIVE] = 1e-4
    momentum: float = 0.9
    warmup_epochs: Annotated[float, NON_NEGATIVE] = 5.0
    warmup_lr_factor: float = 0.01  # warmup starts at lr * factor
    min_lr_factor: float = 0.002  # cosine ends at lr * factor (TransReID's defaults)
    grad_clip: Annotated[float, NON_NEGATIVE] = 0.0  # max grad norm; 0 = off


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, steps_per_epoch: int, epochs: int) -> tuple[Any, Any]:
    """timm optimiser (no weight decay on norms, biases, embeddings) and a per-step warmup + cosine schedule.

    A backbone built with ``layer_decay < 1`` gets per-layer lr multipliers (``lr_scale`` param groups, which
    timm's schedulers apply at every step).
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    params: Any = model
    if any(isinstance(m, FeatureBackbone) and m.layer_decay < 1.0 for m in model.modules()):
        params = layer_decay_param_groups(model, cfg.weight_decay)
    optimizer = create_optimizer_v2(
        params, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    total = max(1, steps_per_epoch * epochs)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    if cfg.warmup_epochs > epochs:  # kept for short smoke runs, but not silently: the peak lr comes at the end
        log.warning(
            "optim.warmup_epochs=%g is longer than the run (%d epochs): the warm-up is cut to %d of %d steps",
            cfg.warmup_epochs, epochs, warmup, total,
        )  # fmt: skip
    schedule = CosineLRScheduler(
        optimizer,
        t_initial=max(1, total - warmup),
        lr_min=cfg.lr * cfg.min_lr_factor,
        warmup_t=warmup,
        warmup_lr_init=cfg.lr * cfg.warmup_lr_factor,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    return optimizer, schedule


def layer_decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Param groups keyed by (lr scale, weight decay): backbone parameters scaled by ``layer_lr_scales``,
    everything else (heads, necks, prompt logits) at scale 1; no decay on 1-d tensors and ``no_weight_decay``."""
    scale_of: dict[str, float] = {}
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    for prefix, module in model.named_modules():
        if isinstance(module, FeatureBackbone):
            scale_of.update({f"{prefix}.{n}" if prefix else n: v for n, v in layer_lr_scales(module).items()})
            skip |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim <= 1 or name in skip else weight_decay
        scale = scale_of.get(name, 1.0)
        group = groups.setdefault((scale, decay), {"params": [], "lr_scale": scale, "weight_decay": decay})
        group["params"].append(param)
    return list(groups.values())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- data ------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """(image path, target) pairs -> (transformed RGB tensor, target, index)."""

    def __init__(self, paths: Sequence[str], targets: Sequence[Any], transform: Callable) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths, self.targets, self.transform = list(paths), targets, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any, int]:
        from PIL import Image

        try:
            with Image.open(self.paths[index]) as img:
                image = img.convert("RGB")
        except OSError as exc:
            raise ClaspError(f"cannot read image {self.paths[index]}: {exc}") from None
        return self.transform(image), self.targets[index], index


# --- batch semantics -------------------------------------------------------------------------------


def per_process_batch(*, global_batch: int, batch_size: int, num_processes: int, key: str, unit: int = 1) -> int:
    """Images per process per step. ``global_batch > 0`` is the recipe's batch over all processes (what a paper
    row states, so its lr stays right on 1 or 8 GPUs): each process takes ``global_batch / num_processes``,
    which must be a whole number of ``unit`` (e.g. K images per identity). ``global_batch = 0`` keeps
    ``batch_size`` per process (the global batch then grows with the number of processes)."""
    if global_batch <= 0:
        return batch_size
    if global_batch % (num_processes * unit):
        raise ClaspError(
            f"{key}={global_batch} does not split over {num_processes} processes"
            + (f" in whole groups of {unit}" if unit > 1 else "")
            + f"; use a multiple of {num_processes * unit} or another number of processes"
        )
    return global_batch // num_processes


def describe_batch(per_process: int, num_processes: int, global_batch: int) -> str:
    """The line printed at start, e.g. ``global batch 512 = 8 processes x 64 (set by the config)``."""
    source = "set by the config" if global_batch > 0 else "per-process batch_size x processes"
    return f"global batch {per_process * num_processes} = {num_processes} processes x {per_process} ({source})"


# --- the fine-tuning loop --------------------------------------------------------------------------

LossFn = Callable[[nn.Module, torch.Tensor, Any], dict[str, torch.Tensor]]


@dataclass
class Prepared:
    """What ``fine_tune`` needs, after ``accelerator.prepare``."""

    model: nn.Module
    optimizer: Any
    schedule: Any
    loader: Any
    steps_per_epoch: int
    generator: torch.Generator  # the loader's shuffle generator: reseed it per epoch for exact resumes


def prepare_training(
    accelerator: Any,
    cfg: Any,
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    collate_fn: Callable | None = None,
) -> Prepared:
    """Shuffled loader (seeded by ``cfg.seed``; the last short batch dropped when there is more than one batch),
    steps per epoch per process (capped by ``cfg.max_steps_per_epoch`` when > 0), optimizer and warmup+cosine
    schedule from ``cfg.optim`` over ``cfg.epochs``, all passed through ``accelerator.prepare``. The per-process
    batch is ``cfg.data.global_batch / processes`` when the config states a global batch (``per_process_batch``)."""
    batch_size = per_process_batch(
        global_batch=cfg.data.global_batch,
        batch_size=cfg.data.batch_size,
        num_processes=accelerator.num_processes,
        key="data.global_batch",
    )
    if accelerator.is_main_process and not cfg.quiet:
        print(describe_batch(batch_size, accelerator.num_processes, cfg.data.global_batch))
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(dataset) > batch_size,
        num_workers=cfg.data.workers,
        collate_fn=collate_fn,
        generator=generator,
    )
    steps_per_epoch = max(1, len(loader) // accelerator.num_processes)
    if cfg.max_steps_per_epoch > 0:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    optimizer, schedule = build_optimizer(model, cfg.optim, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return Prepared(model, optimizer, schedule, loader, steps_per_epoch, generator)


def make_accelerator(cfg: Any) -> tuple[Any, str]:
    """(Accelerator, device name) for ``cfg.device`` / ``cfg.mixed_precision``; seeds ``cfg.seed + rank``."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from pipeline.guards import resolve_device

    device = resolve_device(cfg.device)
    # MoE experts that receive no token in a step have no gradient; DDP must tolerate that
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=cfg.mixed_precision, kwargs_handlers=[ddp])
    seed_everything(cfg.seed + accelerator.process_index)
    return accelerator, device


def fine_tune(
    accelerator: Any,
    cfg: Any,
    *,
    model: nn.Module,
    optimizer: Any,
    schedule: Any,
    loader: Any,
    loss_fn: LossFn,
    steps_per_epoch: int,
    set_epoch: Callable[[int], None],
    name: str,
    ema: Any = None,
) -> dict[str, Any]:
    """Train ``cfg.epochs`` epochs of at most ``steps_per_epoch`` steps, resuming from ``out/checkpoint.pt``.

    ``loss_fn(model, images, targets)`` returns named scalar losses including ``"loss"`` (the one
    optimised); their epoch means are logged in the returned ``history``. ``ema`` (a timm ``ModelEmaV3`` of the
    unwrapped model) is updated after every optimizer step and saved with the checkpoint.
    """
    out = Path(cfg.out_dir)
    quiet = cfg.quiet or not accelerator.is_main_process
    start_epoch, step, history = 0, 0, []
    state = load_checkpoint(out, cfg)
    if state is not None:
        accelerator.unwrap_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if not quiet:
            print(f"resuming {out / CHECKPOINT} after epoch {start_epoch}")
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        set_epoch(epoch)
        model.train()
        sums: dict[str, float] = {}
        done, seen, t_epoch = 0, 0, time.perf_counter()
        total = min(steps_per_epoch, len(loader))  # P x K epochs vary slightly in length
        with progress(total, f"{name} epoch {epoch + 1}/{cfg.epochs}", quiet=quiet, unit="step") as advance:
            for images, targets, _ in loader:
                if done == steps_per_epoch:
                    break
                schedule.step_update(num_updates=step)
                with accelerator.autocast():
                    losses = loss_fn(model, images, targets)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise ClaspError(
                        f"{name} loss became {loss.item()} at epoch {epoch + 1}, step {step}; lower optim.lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                if cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model))  # constant decay from the start (mean teacher)
                step, done, seen = step + 1, done + 1, seen + images.shape[0] * accelerator.num_processes
                for key, value in losses.items():  # all-reduced so every rank logs the same numbers
                    sums[key] = sums.get(key, 0.0) + accelerator.reduce(value.detach(), reduction="mean").item()
                advance(1, loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
        elapsed = time.perf_counter() - t_epoch
        history.append(
            {"epoch": epoch + 1, **{k: v / max(1, done) for k, v in sums.items()}, "images_per_s": seen / elapsed}
        )
        if accelerator.is_main_process:
            save_checkpoint(
                out,
                {
                    "model": accelerator.unwrap_model(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "history": history,
                    "config": to_dict(cfg),
                    **({"ema": ema.state_dict()} if ema is not None else {}),
                },
            )
        accelerator.wait_for_everyone()
    return {"steps": step, "history": history, "wall_s": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def predict_in_order(
    accelerator: Any,
    fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: ImageDataset,
    *,
    batch_size: int,
    workers: int,
) -> torch.Tensor:
    """``fn(images)`` over ``dataset`` on every process, gathered and returned in dataset order (float32, CPU)."""
    loader = accelerator.prepare(torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers))
    outputs, order = [], []
    for images, _, index in loader:
        with accelerator.autocast():
            result = fn(images)
        outputs.append(accelerator.gather_for_metrics(result.float()).cpu())
        order.append(accelerator.gather_for_metrics(index).cpu())
    return torch.cat(outputs)[torch.argsort(torch.cat(order))]


def save_final_model(out_dir: Path, model: nn.Module) -> None:
    """Fine-tuned weights (whole task model) as model.safetensors."""
    from safetensors.torch import save_model

    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_model(model, str(tmp))


# --- checkpoints and results -----------------------------------------------------------------------


def save_checkpoint(out_dir: Path, state: dict[str, Any]) -> None:
    """Training state for resume, written atomically at the end of every epoch."""
    with atomic_path(out_dir / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def load_checkpoint(out_dir: Path, cfg: Any) -> dict[str, Any] | None:
    """The resume state in ``out_dir`` (None if there is none); error if it was written by another config."""
    path = out_dir / CHECKPOINT
    if not path.is_file():
        return None
    state = load_plain_state(path, what="transfer resume state")
    if state.get("config") != to_dict(cfg):
        raise ClaspError(f"{path} was written by a different configuration; use another --out or delete it")
    return state


def finished_results(out_dir: Path, cfg: Any) -> dict[str, Any] | None:
    """The results of a completed run with the same config in ``out_dir``; error if its config differs."""
    path = out_dir / RESULTS_JSON
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("config") != json.loads(json.dumps(to_dict(cfg))):
        raise ClaspError(
            f"{out_dir} already holds results of a different configuration; use another --out or delete {path}"
        )
    return record


def write_results(
    out_dir: Path,
    cfg: Any,
    record: dict[str, Any],
    *,
    title: str,
    table: list[tuple[str, str]],
) -> dict[str, Any]:
    """Write config.yaml, results.md (title, protocol, table) and, last, results.json (record + config).

    results.json marks the run complete, so the resume checkpoint is deleted after it.
    """
    record = {**record, "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    record["headline"] = dict(table)  # what `clasp transfer` prints when it ends
    record["config"] = json.loads(json.dumps(to_dict(cfg)))
    save_config(cfg, out_dir / "config.yaml")
    lines = [f"# {title}", ""]
    for label in ("protocol", "layout", "backbone", "prompt", "training"):
        if record.get(label):
            lines.append(f"- **{label}**: {_md_value(record[label])}")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in table]
    with atomic_path(out_dir / RESULTS_MD) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    write_json_atomic(out_dir / RESULTS_JSON, record)
    (out_dir / CHECKPOINT).unlink(missing_ok=True)
    return record


def _md_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def pct(value: float) -> str:
    return f"{100.0 * value:.2f}"
