"""Checks every stage runs before it starts work: enough disk for its outputs, a device that exists.

They turn the classic mid-job failures (disk full after three hours, `cuda` asked for on a CPU
node) into one-line refusals up front.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.errors import ClaspError

# Tests and cautious users can pretend the disk is smaller than it is (bytes).
DISK_LIMIT_ENV = "CLASP_DISK_LIMIT_BYTES"
SAFETY_MARGIN = 1.10


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    probe = Path(path).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    limit = os.environ.get(DISK_LIMIT_ENV)
    return min(free, int(limit)) if limit else free


def ensure_free_space(path: str | Path, needed_bytes: int, *, what: str) -> None:
    """Refuse to start when ``path`` lacks room for ``needed_bytes`` (+10% margin) of ``what``."""
    need = int(needed_bytes * SAFETY_MARGIN)
    have = free_bytes(path)
    if have < need:
        raise ClaspError(
            f"not enough disk space for {what} in {path}: needs about {_human(need)}, "
            f"{_human(have)} free. Free some space or choose another output location."
        )


def resolve_device(requested: str = "auto") -> str:
    """``auto`` -> cuda if present else cpu; an explicit cuda device that does not exist is an error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ClaspError(f"device '{requested}' was requested but no CUDA GPU is visible; use device=cpu or auto")
        index = int(requested.split(":", 1)[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise ClaspError(f"device '{requested}' does not exist: {torch.cuda.device_count()} GPU(s) visible")
        return requested
    if requested != "cpu":
        raise ClaspError(f"unknown device '{requested}': use auto, cpu, cuda or cuda:N")
    return requested


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
