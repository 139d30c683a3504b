"""Stop a child process at a chosen atomic write, so a test can kill -9 it at exactly that moment.

The hook lives here, not in the product: ``pause_write_env(GLOB, N)`` gives a child the environment that loads
``pause_write/sitecustomize.py`` at interpreter start (its folder goes first on ``PYTHONPATH``, so every
process the child starts, launcher ranks and loader workers included, loads it too). It wraps
``pipeline.formats.atomic_path``: the N-th write in that process whose file name matches GLOB stops with its
temporary file complete but not yet renamed, writes ``<tmp>.paused`` (holding the pid) and sleeps.
"""

from __future__ import annotations

import os
from pathlib import Path

PAUSE_WRITE_ENV = "CLASP_TEST_PAUSE_WRITE"  # "GLOB[:N]", N = 1 unless given
HOOK_DIR = Path(__file__).resolve().parent / "pause_write"


def pause_write_env(pattern: str, nth: int = 1) -> dict[str, str]:
    """Environment entries for a child that stalls at its ``nth`` atomic write of a file matching ``pattern``."""
    python_path = [str(HOOK_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {PAUSE_WRITE_ENV: f"{pattern}:{nth}", "PYTHONPATH": os.pathsep.join(python_path)}
