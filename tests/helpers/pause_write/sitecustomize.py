"""Loaded at start-up by children the tests start with ``helpers.fault_injection.pause_write_env``.

Wraps ``pipeline.formats.atomic_path`` before any stage module imports it (see fault_injection.py).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import time
from collections.abc import Iterator
from pathlib import Path

SPEC = os.environ.get("CLASP_TEST_PAUSE_WRITE", "")
SLEEP_S = 300  # long enough for any test to notice the marker and kill the process


def _install(pattern: str, nth: int) -> None:
    import pipeline.formats as formats

    write_atomically = formats.atomic_path
    matched = 0

    @contextlib.contextmanager
    def atomic_path(path: str | Path) -> Iterator[Path]:
        nonlocal matched
        with write_atomically(path) as tmp:
            yield tmp
            if fnmatch.fnmatch(Path(path).name, pattern):
                matched += 1
                if matched == nth:  # the temporary file is complete; the rename has not happened
                    Path(f"{tmp}.paused").write_text(str(os.getpid()))
                    time.sleep(SLEEP_S)

    formats.atomic_path = atomic_path


if SPEC:
    _pattern, _, _nth = SPEC.partition(":")
    _install(_pattern, int(_nth or 1))
