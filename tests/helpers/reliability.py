"""Helpers of the reliability suite: run a stage in a child, stop it at a chosen write and kill -9 it;
run the ``clasp`` console script; the tiny CLIP and pre-training settings every test uses.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import labels
from helpers.fault_injection import pause_write_env
from helpers.pretraining import TINY_DATA, TINY_MODEL

REPO = Path(__file__).resolve().parents[2]
CORPUS = "rel"
PER_SHARD = 8
CLASP = Path(sys.executable).with_name("clasp")  # the console script of this environment
TINY_PRETRAIN = [f"data.corpus={CORPUS}", *TINY_DATA, *TINY_MODEL]


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def start_python(code: str, **env: str) -> subprocess.Popen:
    """``python -c code`` in the repository, output captured."""
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def kill_at_write(code: str, watch: Path, pattern: str, nth: int = 1, timeout_s: float = 240) -> Path:
    """Run ``code`` in a child, let it stall at the ``nth`` atomic write of a file matching ``pattern``
    (temporary file complete, not yet renamed), kill -9 it there; returns the stalled temporary file."""
    proc = start_python(code, **pause_write_env(pattern, nth))
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            marks = list(watch.rglob("*.paused")) if watch.exists() else []
            if marks:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the child ended before reaching write {nth} of {pattern}: {proc.communicate()}"
        assert marks, f"no write of {pattern} reached within {timeout_s} s"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    mark = marks[0]
    stalled = mark.with_name(mark.name.removesuffix(".paused"))
    assert stalled.is_file(), f"{stalled} should be the half-done write"
    mark.unlink()  # the marker is the test's, not the stage's; what the stage left is the temporary file
    return stalled


def clasp(*args: str, env: dict[str, str] | None = None, timeout_s: float = 180) -> subprocess.CompletedProcess:
    """Run the ``clasp`` console script as a user would."""
    return subprocess.run(
        [str(CLASP), *args], cwd=REPO, env=child_env(**(env or {})), capture_output=True, text=True, timeout=timeout_s
    )


def clasp_all(*calls: list[str], timeout_s: float = 240) -> list[subprocess.CompletedProcess]:
    """Several ``clasp`` commands started together (each pays the interpreter start; this overlaps them)."""
    procs = [
        subprocess.Popen([str(CLASP), *args], cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for args in calls
    ]  # fmt: skip
    results = []
    for args, proc in zip(calls, procs, strict=True):
        out, err = proc.communicate(timeout=timeout_s)
        results.append(subprocess.CompletedProcess([str(CLASP), *args], proc.returncode, out, err))
    return results


def clasp_in_process(*args: str) -> tuple[int, str]:
    """``clasp ARGS`` through the console script's own entry point (pipeline.cli.main), in this process:
    (exit status, stderr). For cases that need a model, where a fresh interpreter would cost seconds."""
    import contextlib
    import io

    from pipeline import cli

    argv, err = sys.argv, io.StringIO()
    sys.argv = ["clasp", *args]
    try:
        with contextlib.redirect_stderr(err):
            try:
                cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return code, err.getvalue()


def assert_user_error(done: subprocess.CompletedProcess | tuple[int, str], *needles: str) -> str:
    """Exit status 2, one line on stderr that contains every needle, no traceback; returns the line."""
    code, stderr = (done.returncode, done.stderr) if isinstance(done, subprocess.CompletedProcess) else done
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_clip_dir(path: Path, seed: int = 0) -> Path:
    """The labeling tests' random tiny CLIP, named rel-tiny."""
    return labels.write_clip_dir(path, seed=seed, arch="rel-tiny")


def ingest_code(source: Path, root: Path, **kw: object) -> str:
    args = dict(source=str(source), corpus=CORPUS, root=str(root), images_per_shard=PER_SHARD, workers=1, quiet=True)
    args.update(kw)
    return f"from pipeline.ingest import IngestConfig, ingest; ingest(IngestConfig(**{args!r}))"


def label_args(root: Path, clip_dir: Path, **kw: object) -> dict:
    args = dict(
        root=str(root), corpus=CORPUS, clip_checkpoint=str(clip_dir), allow_random_weights=True,
        resolution=(64, 32), workers=0, batch_size=4, quiet=True,
    )  # fmt: skip
    return {**args, **kw}


def label_code(root: Path, clip_dir: Path, **kw: object) -> str:
    args = label_args(root, clip_dir, **kw)
    return f"from labeling.label import LabelConfig, run_labeling; run_labeling(LabelConfig(**{args!r}))"


def label_config(root: Path, clip_dir: Path, **kw: object):  # noqa: ANN201 - LabelConfig
    from labeling.label import LabelConfig

    return LabelConfig(**label_args(root, clip_dir, **kw))


def pretrain_overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", *TINY_PRETRAIN, f"out={out}", *extra]


def pretrain_config(root: Path, out: Path, *extra: str):  # noqa: ANN201 - PretrainConfig
    from pipeline.config import load_config
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, overrides=pretrain_overrides(root, out, *extra))


def pretrain_code(root: Path, out: Path, *extra: str) -> str:
    return (
        "from pipeline.config import load_config; from pretrain.config import PretrainConfig; "
        "from pretrain.trainer import train; "
        f"train(load_config(PretrainConfig, overrides={pretrain_overrides(root, out, *extra)!r}))"
    )


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
