"""Hyper-parameter schedules precomputed as arrays and indexed by optimizer step (as DINOv2 does).

Indexing a precomputed array makes a resumed run use exactly the values the uninterrupted run
used at the same step, and lets the whole schedule be plotted or checked before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cosine_schedule(
    base: float, final: float, total_steps: int, *, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """``total_steps`` values: linear ``warmup_start -> base`` over ``warmup_steps``, then cosine ``base -> final``."""
    if total_steps <= 0:
        raise ValueError(f"a schedule needs at least one step, got {total_steps}")
    warmup_steps = min(max(0, warmup_steps), total_steps)
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    n = total_steps - warmup_steps
    progress = np.arange(n) / max(1, n - 1) if n > 1 else np.zeros(n)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * progress))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def linear_then_constant(start: float, end: float, total_steps: int, ramp_steps: int) -> np.ndarray:
    """Linear ``start -> end`` over ``ramp_steps``, then ``end`` (DINO's teacher temperature)."""
    ramp_steps = min(max(0, ramp_steps), total_steps)
    return np.concatenate([np.linspace(start, end, ramp_steps, endpoint=False), np.full(total_steps - ramp_steps, end)])


@dataclass(frozen=True)
class Schedules:
    """Every per-step value the training loop needs."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray  # teacher EMA momentum
    teacher_temp: np.ndarray

    @property
    def total_steps(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> dict[str, float]:
        """Values at ``step`` (clamped to the last step, so runs past the schedule keep the final values)."""
        i = min(step, self.total_steps - 1)
        return {
            "lr": float(self.lr[i]),
            "weight_decay": float(self.weight_decay[i]),
            "momentum": float(self.momentum[i]),
            "teacher_temp": float(self.teacher_temp[i]),
        }


def build_schedules(optim: object, loss: object, *, steps_per_epoch: int, global_batch: int) -> Schedules:
    """Schedules of a ``pretrain.config.OptimConfig`` and ``pretrain.model_config.LossConfig``."""
    total = optim.epochs * steps_per_epoch
    peak = optim.lr * global_batch / 256 if optim.scale_lr_with_batch else optim.lr
    return Schedules(
        lr=cosine_schedule(peak, optim.min_lr, total, warmup_steps=round(optim.warmup_epochs * steps_per_epoch)),
        weight_decay=cosine_schedule(optim.weight_decay, optim.weight_decay_end, total),
        momentum=cosine_schedule(optim.momentum_teacher, optim.momentum_teacher_end, total),
        teacher_temp=linear_then_constant(
            loss.warmup_teacher_temp, loss.teacher_temp, total, loss.warmup_teacher_temp_steps
        ),
    )
