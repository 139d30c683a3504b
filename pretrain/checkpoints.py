"""Pre-training checkpoints on disk: where they are, which one a run resumes from, atomic writes, clean-up.

A run folder holds ``checkpoints/step-NNNNNNNNN.pt`` (written atomically; the newest ``keep_last`` kept)
and ``log.jsonl``. The state a checkpoint holds is listed in ``pretrain.trainer``; ``export_run`` turns
one into a release (``pretrain.export``).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from pipeline import formats
from pipeline.config import to_dict
from pipeline.errors import ClaspError
from pretrain.config import PretrainConfig

CHECKPOINT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_path(out: str | Path, step: int) -> Path:
    return Path(out) / CHECKPOINT_DIR / f"step-{step:09d}.pt"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files of interrupted writes are ignored)."""
    folder = Path(out) / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(cfg: PretrainConfig) -> Path | None:
    """The checkpoint to resume from: ``latest`` (None if the run has none), ``none``, or a path."""
    existing = list_checkpoints(cfg.out)
    if cfg.resume == "latest":
        return existing[-1] if existing else None
    if cfg.resume == "none":
        if existing:
            raise ClaspError(
                f"{cfg.out} already has checkpoints (newest {existing[-1].name}) and resume=none: "
                "use resume=latest to continue that run, or choose a fresh out=DIR"
            )
        return None
    path = Path(cfg.resume)
    if not path.is_file():
        raise ClaspError(f"resume={cfg.resume}: no such checkpoint file (use latest, none, or a step-*.pt path)")
    return path


def model_changes(state: dict[str, Any], cfg: PretrainConfig) -> str:
    """The model settings that differ between a checkpoint's config and ``cfg``: "model.arch vit_micro -> vit_tiny"."""
    old, new = _flat(state.get("config", {}).get("model", {}), "model."), _flat(to_dict(cfg.model), "model.")
    return ", ".join(
        f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)
    )


def _flat(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def save_checkpoint(path: Path, state: dict[str, Any], keep_last: int) -> None:
    """Write ``state`` atomically, then delete all but the newest ``keep_last`` step checkpoints."""
    with formats.atomic_path(path) as tmp:
        torch.save(state, tmp)
    if keep_last > 0:
        for old in list_checkpoints(path.parent.parent)[:-keep_last]:
            old.unlink(missing_ok=True)


def checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Size of one checkpoint: the model state plus AdamW's two moments of every trained parameter."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trained = sum(p.numel() * 4 for group in optimizer.param_groups for p in group["params"] if p.requires_grad)
    return state + 2 * trained


def forget_after(out: Path, step: int) -> None:
    """Undo what a killed run left past its last checkpoint: temporary checkpoint files and log rows after ``step``.

    The resumed run recomputes those steps exactly, so keeping their rows would count them twice.
    """
    for stale in (out / CHECKPOINT_DIR).glob("*.tmp-*"):
        stale.unlink(missing_ok=True)
    log_path = out / "log.jsonl"
    if not log_path.is_file():
        return
    lines = log_path.read_text().splitlines()
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) != len(lines):
        with formats.atomic_path(log_path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))


def _row_step(line: str) -> float:
    """Step of a log.jsonl row; a row torn by a kill counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def export_run(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """``clasp export``: the teacher backbone of a checkpoint (or of a run directory's latest one) as a release."""
    from pretrain.export import export_backbone

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        found = list_checkpoints(checkpoint)
        if not found:
            raise ClaspError(
                f"{checkpoint} has no {CHECKPOINT_DIR}/step-*.pt: pass a checkpoint file or a run directory"
            )
        checkpoint = found[-1]
    if not checkpoint.is_file():
        raise ClaspError(f"checkpoint {checkpoint} does not exist")
    # mmap: the card facts are tiny, the tensors need not be read here
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise ClaspError(
            f"{checkpoint} is not a pre-training checkpoint (torch.load: {type(exc).__name__}): give a run folder "
            f"or one of its {CHECKPOINT_DIR}/step-*.pt files"
        ) from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise ClaspError(f"{checkpoint} is not a pre-training checkpoint (no model/config): give a run folder")
    data = state.get("data") or {}
    card = {
        "corpus": data.get("corpus", "unknown"),
        "labelset_id": data.get("labelset", "unknown"),
        "corpus_images": data.get("images", "unknown"),
        "optimizer_steps": state.get("step", "unknown"),
        "processes": state.get("world_size", "unknown"),
        "checkpoint": str(checkpoint),
    }
    del state
    return export_backbone(checkpoint, Path(out_dir), card=card)
