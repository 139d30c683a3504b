"""What a resumed pre-training run must agree on with its checkpoint, and what an accepted change does.

A checkpoint pins the run's identity (``RunIdentity``: label set, image count, world size, global
batch, steps per epoch, and the stream layout behind them) and its resolved config. Resuming with a
different identity or config is refused in one line naming each setting with both values and the
``resume_accept=[...]`` entry that accepts it. Accepting is explicit, and its effect is stated:

* a change of world size or global batch (``world_size``, ``data.batch_size``, ``grad_accum``)
  rescales the schedule by images: the run continues at step ``images seen // new global batch``
  of the schedule recomputed for the new global batch;
* a change of the stream layout (world size, per-process batch, micro-batches per step, loader
  workers, shuffle block, seed, label set) cannot continue the interrupted epoch by position (each
  reader's span moves), so the stream starts the next epoch; the interrupted epoch stays partial
  (some images unseen in it, none seen twice);
* any other setting (``optim.lr``, ...) simply takes its new value from the resume step on.

The previous ``config.yaml`` is kept as ``config.before-step-NNNNNNNNN.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.errors import ClaspError

# Settings that may change between a run and its resume without being a change of the experiment.
RUN_BOOKKEEPING = {
    "out", "resume", "resume_accept", "max_steps", "quiet", "log_every", "tensorboard", "wandb", "wandb_project",
    "keep_last", "checkpoint_every", "cpu", "data.root", "data.prefetch_factor", "data.pin_memory",
    "data.labelset", "data.steps_per_epoch",  # resolved at start: compared through the run identity
}  # fmt: skip
# Accepting one of these also accepts what it implies for the global batch / steps per epoch.
_DERIVED = {
    "global_batch": {"world_size", "data.batch_size", "grad_accum"},
    "steps_per_epoch": {"world_size", "data.batch_size", "grad_accum", "data.steps_per_epoch", "labelset"},
    "images": {"labelset"},
}
_LAYOUT_CONFIG = {"data.workers", "data.shuffle_buffer", "data.batch_size", "grad_accum", "seed"}


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint pins; stored as ``checkpoint["identity"]``."""

    labelset: str
    images: int
    world_size: int
    global_batch: int
    steps_per_epoch: int
    stream_origin: tuple[int, int] = (0, 0)  # (step, epoch) at which the data stream's readers started at 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stream_origin": list(self.stream_origin)}


@dataclass(frozen=True)
class ResumePlan:
    step: int
    stream_origin: tuple[int, int]
    changes: tuple[str, ...]  # "key: old -> new" of every accepted change


def saved_identity(state: dict[str, Any]) -> RunIdentity:
    """The identity a checkpoint pins (checkpoints from before it was stored: read from its config)."""
    if "identity" in state:
        ident = dict(state["identity"])
        ident["stream_origin"] = tuple(ident.get("stream_origin", (0, 0)))
        return RunIdentity(**ident)
    cfg, data = state.get("config", {}), state.get("data", {})
    world = int(state.get("world_size", 1))
    batch = int(cfg.get("data", {}).get("batch_size", 0)) * world * int(cfg.get("grad_accum", 1))
    return RunIdentity(
        labelset=str(data.get("labelset")),
        images=int(data.get("images", 0)),
        world_size=world,
        global_batch=batch,
        steps_per_epoch=int(cfg.get("data", {}).get("steps_per_epoch") or 0),
    )


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted settings whose value differs between the checkpoint's config and this run's (bookkeeping aside)."""
    old, new = _flat(saved), _flat(now)
    keys = (set(old) | set(new)) - RUN_BOOKKEEPING
    return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


def plan_resume(
    *,
    checkpoint: str,
    step: int,
    saved: RunIdentity,
    saved_config: dict[str, Any],
    now: RunIdentity,
    now_config: dict[str, Any],
    accept: set[str],
) -> ResumePlan:
    """Check a resume against its checkpoint; refuse what is not accepted, say what an accepted change does."""
    diffs: dict[str, tuple[Any, Any]] = {}
    for name in ("labelset", "images", "world_size", "global_batch", "steps_per_epoch"):
        old, new = getattr(saved, name), getattr(now, name)
        if old != new:
            diffs[name] = (old, new)
    diffs.update(config_changes(saved_config, now_config))
    refused = [
        name for name in diffs if name not in accept and not (_DERIVED.get(name, set()) & accept)
    ]  # fmt: skip
    if refused:
        shown = "; ".join(f"{name} was {diffs[name][0]!r}, is {diffs[name][1]!r} now" for name in refused)
        hint = (
            " (a new GPU count: the schedule is rescaled to the new global batch, the stream starts the next epoch)"
            if {"world_size", "global_batch"} & set(refused)
            else ""
        )
        causes = [name for name in refused if not (_DERIVED.get(name, set()) & set(diffs))]  # not one's consequence
        raise ClaspError(
            f"resume from {checkpoint}: {shown}. Keep the run's settings, add resume_accept=[{','.join(causes)}] to "
            f"continue with the new ones{hint}, or choose a fresh out=DIR"
        )
    new_step, origin = step, saved.stream_origin
    if now.global_batch != saved.global_batch:
        new_step = step * saved.global_batch // now.global_batch
    layout_changed = any(
        name in diffs for name in ("labelset", "images", "world_size", "global_batch", *_LAYOUT_CONFIG)
    )
    if layout_changed:
        seen = (step - saved.stream_origin[0]) * saved.global_batch
        origin = (new_step, saved.stream_origin[1] + math.ceil(seen / max(1, saved.images)))
    changes = tuple(f"{name}: {old!r} -> {new!r}" for name, (old, new) in diffs.items())
    if new_step != step:
        changes += (f"step: {step} -> {new_step} (images seen {step * saved.global_batch}, schedule rescaled)",)
    if origin != saved.stream_origin:
        changes += (f"data stream: starts epoch {origin[1]} at step {origin[0]} (the interrupted epoch stays partial)",)
    return ResumePlan(new_step, origin, changes)
