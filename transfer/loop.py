"""The one fine-tune loop every transfer task trains with: accelerator, shuffled loader + optimiser, epochs of
steps with resume from ``checkpoint.pt``, and in-order prediction over processes.

A task (or one stage of a multi-stage task) states its loop as a ``LoopConfig`` (epochs, step cap, optimiser);
``prepare_training`` or the task builds a ``Training`` (model, optimiser, schedule, loader, per-epoch reseed),
and ``fine_tune`` runs it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from pipeline.config import AT_LEAST_ONE, to_dict
from pipeline.errors import ClaspError
from pipeline.formats import atomic_path
from pipeline.progress import progress
from pipeline.safe_load import load_plain_state
from transfer.data import BatchConfig, describe_batch, per_process_batch
from transfer.optim import OptimConfig, build_optimizer

CHECKPOINT = "checkpoint.pt"

LossFn = Callable[[nn.Module, torch.Tensor, Any], dict[str, torch.Tensor]]


@dataclass
class LoopConfig:
    """What the fine-tune loop reads: a task's top-level settings, or one stage's of a multi-stage task."""

    epochs: Annotated[int, AT_LEAST_ONE] = 1
    max_steps_per_epoch: int = 0  # 0 = full epochs; >0 caps them (smoke tests)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def cap(self, steps: int) -> int:
        """Steps per epoch after ``max_steps_per_epoch``."""
        return min(steps, self.max_steps_per_epoch) if self.max_steps_per_epoch > 0 else steps


@runtime_checkable
class EpochAware(Protocol):
    """A dataset (or sampler) whose random draws depend on the epoch, so a resumed run repeats them."""

    def set_epoch(self, epoch: int) -> None: ...


@dataclass
class Training:
    """What ``fine_tune`` runs, after ``accelerator.prepare``."""

    model: nn.Module
    optimizer: Any
    schedule: Any
    loader: Any
    steps_per_epoch: int
    set_epoch: Callable[[int], None]  # called before each epoch: same shuffles and augmentations after a resume


@dataclass
class FineTuneResult:
    """What a finished loop reports: optimizer steps, per-epoch loss means and throughput, wall time."""

    steps: int
    history: list[dict[str, float]]
    wall_s: float
    device: str = ""

    def final_loss(self, digits: int = 4) -> float | None:
        return round(self.history[-1]["loss"], digits) if self.history else None

    def record(self, epochs: int, *, loss_digits: int = 4) -> dict[str, Any]:
        """The ``training`` block of results.json."""
        return {
            "epochs": epochs,
            "steps": self.steps,
            "wall_s": self.wall_s,
            "device": self.device,
            "final_loss": self.final_loss(loss_digits),
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_accelerator(*, device: str, mixed_precision: str, seed: int) -> tuple[Any, str]:
    """(Accelerator, device name) for ``device`` / ``mixed_precision``; seeds ``seed + rank``."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from pipeline.guards import resolve_device

    name = resolve_device(device)
    # MoE experts that receive no token in a step have no gradient; DDP must tolerate that
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=name == "cpu", mixed_precision=mixed_precision, kwargs_handlers=[ddp])
    seed_everything(seed + accelerator.process_index)
    return accelerator, name


def prepare_training(
    accelerator: Any,
    loop: LoopConfig,
    batch: BatchConfig,
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    seed: int,
    quiet: bool,
    collate_fn: Callable | None = None,
) -> Training:
    """Shuffled loader (reseeded ``seed * 1000 + epoch`` each epoch; the last short batch dropped when there is
    more than one batch), steps per epoch per process (capped by ``loop.max_steps_per_epoch``), optimizer and
    warmup+cosine schedule over ``loop.epochs``, all passed through ``accelerator.prepare``. The per-process
    batch is ``batch.global_batch / processes`` when the config states a global batch (``per_process_batch``).
    A dataset with ``set_epoch`` is told the epoch too."""
    batch_size = per_process_batch(
        global_batch=batch.global_batch,
        batch_size=batch.batch_size,
        num_processes=accelerator.num_processes,
        key="data.global_batch",
    )
    if accelerator.is_main_process and not quiet:
        print(describe_batch(batch_size, accelerator.num_processes, batch.global_batch))
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(dataset) > batch_size,
        num_workers=batch.workers,
        collate_fn=collate_fn,
        generator=generator,
    )
    steps_per_epoch = loop.cap(max(1, len(loader) // accelerator.num_processes))
    optimizer, schedule = build_optimizer(model, loop.optim, steps_per_epoch=steps_per_epoch, epochs=loop.epochs)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    def set_epoch(epoch: int) -> None:
        generator.manual_seed(seed * 1000 + epoch)
        if isinstance(dataset, EpochAware):
            dataset.set_epoch(epoch)

    return Training(model, optimizer, schedule, loader, steps_per_epoch, set_epoch)


def fine_tune(
    accelerator: Any,
    loop: LoopConfig,
    training: Training,
    *,
    loss_fn: LossFn,
    out_dir: Path,
    run_config: Any,
    name: str,
    quiet: bool,
    ema: Any = None,
) -> FineTuneResult:
    """Train ``loop.epochs`` epochs of at most ``training.steps_per_epoch`` steps, resuming from
    ``out_dir/checkpoint.pt`` (refused when it was written under another ``run_config``, the run's whole config).

    ``loss_fn(model, images, targets)`` returns named scalar losses including ``"loss"`` (the one optimised);
    their epoch means are logged in the returned history. ``ema`` (a timm ``ModelEmaV3`` of the unwrapped model)
    is updated after every optimizer step and saved with the checkpoint.
    """
    quiet = quiet or not accelerator.is_main_process
    start_epoch, step, history = _resume(accelerator, training, out_dir, run_config, ema, quiet=quiet)
    t0 = time.perf_counter()
    for epoch in range(start_epoch, loop.epochs):
        training.set_epoch(epoch)
        step, sums, done, seen, elapsed = _train_epoch(
            accelerator, loop, training, loss_fn, ema, step=step, epoch=epoch, name=name, quiet=quiet
        )
        history.append(
            {"epoch": epoch + 1, **{k: v / max(1, done) for k, v in sums.items()}, "images_per_s": seen / elapsed}
        )
        if accelerator.is_main_process:
            state = {
                "model": accelerator.unwrap_model(training.model).state_dict(),
                "optimizer": training.optimizer.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "history": history,
                "config": to_dict(run_config),
                **({"ema": ema.state_dict()} if ema is not None else {}),
            }
            save_checkpoint(out_dir, state)
        accelerator.wait_for_everyone()
    return FineTuneResult(steps=step, history=history, wall_s=round(time.perf_counter() - t0, 1))


def _resume(
    accelerator: Any, training: Training, out_dir: Path, run_config: Any, ema: Any, *, quiet: bool
) -> tuple[int, int, list[dict[str, float]]]:
    """(first epoch, step, history) from the checkpoint in ``out_dir``, its weights loaded; (0, 0, []) without."""
    state = load_checkpoint(out_dir, run_config)
    if state is None:
        return 0, 0, []
    accelerator.unwrap_model(training.model).load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    if not quiet:
        print(f"resuming {out_dir / CHECKPOINT} after epoch {state['epoch']}")
    return state["epoch"], state["step"], state["history"]


def _train_epoch(
    accelerator: Any,
    loop: LoopConfig,
    training: Training,
    loss_fn: LossFn,
    ema: Any,
    *,
    step: int,
    epoch: int,
    name: str,
    quiet: bool,
) -> tuple[int, dict[str, float], int, int, float]:
    """One epoch: (step after it, summed all-reduced losses, steps done, images seen, seconds)."""
    model, optimizer = training.model, training.optimizer
    model.train()
    sums: dict[str, float] = {}
    done, seen, t_epoch = 0, 0, time.perf_counter()
    total = min(training.steps_per_epoch, len(training.loader))  # P x K epochs vary slightly in length
    with progress(total, f"{name} epoch {epoch + 1}/{loop.epochs}", quiet=quiet, unit="step") as advance:
        for images, targets, _ in training.loader:
            if done == training.steps_per_epoch:
                break
            training.schedule.step_update(num_updates=step)
            with accelerator.autocast():
                losses = loss_fn(model, images, targets)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise ClaspError(f"{name} loss became {loss.item()} at epoch {epoch + 1}, step {step}; lower optim.lr")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if loop.optim.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), loop.optim.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(accelerator.unwrap_model(model))  # constant decay from the start (mean teacher)
            step, done, seen = step + 1, done + 1, seen + images.shape[0] * accelerator.num_processes
            for key, value in losses.items():  # all-reduced so every rank logs the same numbers
                sums[key] = sums.get(key, 0.0) + accelerator.reduce(value.detach(), reduction="mean").item()
            advance(1, loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
    return step, sums, done, seen, time.perf_counter() - t_epoch


@torch.no_grad()
def predict_in_order(
    accelerator: Any,
    fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: torch.utils.data.Dataset,
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
