"""How a ``clasp`` command runs as a process: exit codes, Ctrl-C, and the output folders a failure leaves.

User mistakes (ClaspError) print one line ``error: ...`` and exit with status 2; Ctrl-C prints one line and
exits with 130 (rerunning resumes); a failed command leaves no empty output folder behind. Kept apart from
the commands (pipeline/cli.py) so they stay one small registration each.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.errors import ClaspError

INTERRUPTED = "interrupted: rerun the same command to resume"


@contextlib.contextmanager
def no_empty_output(*folders: str | Path | None) -> Iterator[None]:
    """Refuse output ``folders`` that are files; on failure (error or Ctrl-C), remove those this command
    created that hold no output (bookkeeping such as ``.ingest/lock`` does not count)."""
    for folder in (Path(f) for f in folders if f is not None):
        if folder.exists() and not folder.is_dir():
            raise ClaspError(f"output folder {folder} is a file: give the path of a folder (new or existing)")
    made = [Path(f) for f in folders if f is not None and not Path(f).exists()]
    try:
        yield
    except BaseException:
        for folder in made:
            files = [p.relative_to(folder) for p in folder.rglob("*") if p.is_file()]
            if not any(not any(part.startswith(".") for part in f.parts) for f in files):
                shutil.rmtree(folder, ignore_errors=True)
        raise


class Interrupted(BaseException):
    """Ctrl-C in the main process; not a KeyboardInterrupt, which click would turn into "Aborted!"."""


def _on_sigint(signum: int, frame: object, *, main_pid: int) -> None:
    # forked workers (DataLoader) inherit this handler: they ignore Ctrl-C and the main process stops them
    if os.getpid() == main_pid:
        raise Interrupted()


def run(app: Callable[[], object]) -> None:
    """Run the typer ``app`` as the ``clasp`` process: ``error: ...`` + exit 2, Ctrl-C + exit 130."""
    import typer

    signal.signal(signal.SIGINT, functools.partial(_on_sigint, main_pid=os.getpid()))
    try:
        app()
    except ClaspError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the message
        typer.secho(INTERRUPTED, err=True)
        sys.exit(130)
