"""What every transfer task shares: the task registry, optimiser + warmup/cosine schedule, the image
dataset, resumable checkpoints, progress display, and results written as JSON + Markdown.

Task contract (so pose, detection, person search and parsing slot in as further names): a task
module listed in ``TASKS`` defines ``CONFIG`` (a dataclass with at least ``data_dir``, ``dataset``,
``out_dir``, ``quiet`` and ``backbone: BackboneConfig``) and ``run(cfg) -> dict`` returning the
results record it wrote to ``out_dir/results.json``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from pipeline.config import save_config, to_dict
from pipeline.errors import ClaspError
from pipeline.formats import atomic_path, write_json_atomic

TASKS: dict[str, str] = {
    "reid": "transfer.reid.train",
    "attributes": "transfer.attributes.train",
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
    lr: float = 0.008
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: float = 5.0
    warmup_lr_factor: float = 0.01  # warmup starts at lr * factor
    min_lr_factor: float = 0.002  # cosine ends at lr * factor (TransReID's defaults)
    grad_clip: float = 0.0  # max grad norm; 0 = off


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, steps_per_epoch: int, epochs: int) -> tuple[Any, Any]:
    """timm optimiser (no weight decay on norms, biases, embeddings) and a per-step warmup + cosine schedule."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    optimizer = create_optimizer_v2(
        model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    total = max(1, steps_per_epoch * epochs)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
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


# --- checkpoints and results -----------------------------------------------------------------------


def save_checkpoint(out_dir: Path, state: dict[str, Any]) -> None:
    """Training state for resume, written atomically at the end of every epoch."""
    with atomic_path(out_dir / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def load_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / CHECKPOINT
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


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
    """Write config.yaml, results.json (record + config) and results.md (title, protocol, table)."""
    record = {**record, "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
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
    return record


def _md_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def pct(value: float) -> str:
    return f"{100.0 * value:.2f}"


# --- progress --------------------------------------------------------------------------------------


@contextlib.contextmanager
def progress(total: int, description: str, *, quiet: bool, unit: str = "img") -> Iterator[Callable[..., None]]:
    """Yield ``advance(n, **fields)``; a rich bar with throughput and ETA unless ``quiet``."""
    if quiet:
        yield lambda n=1, **fields: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class SpeedColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:.1f} {unit}/s" if task.speed else f"- {unit}/s")

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        SpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total, status="")

        def advance(n: int = 1, **fields: Any) -> None:
            status = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            bar.update(task, advance=n, status=status)

        yield advance
