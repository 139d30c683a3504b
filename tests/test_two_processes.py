"""Two launched CPU processes (gloo, ``accelerate launch --num_processes 2``): a pre-training run killed after a
checkpoint and resumed equals the uninterrupted run, batch by batch and loss by loss; its batches are the
ones the stream simulator predicts; and a resume on another process count is refused, or rescaled when
accepted. Tiny corpus and model of helpers/pretraining.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers.fault_injection import pause_write_env
from helpers.launching import accelerate_launch
from helpers.pretraining import REPO, SPY, TINY_MODEL, losses, tiny_config, write_corpus

from benchmarks.stream_coverage import measure
from pipeline.errors import ClaspError
from pretrain.trainer import list_checkpoints, train


def launch(script: Path, corpus: Path, *overrides: str, **env_extra: str) -> subprocess.Popen:
    cmd = accelerate_launch(str(script), str(corpus), *TINY_MODEL, *overrides)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **env_extra)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when_paused(proc: subprocess.Popen, out: Path, timeout_s: float = 300) -> None:
    """kill -9 the launcher, both ranks and their loader workers once rank 0 stalls at the write chosen by
    pause_write_env (rank 1 is then waiting for it)."""
    deadline = time.monotonic() + timeout_s
    while not list(out.rglob("*.paused")):
        assert proc.poll() is None, f"the run ended before the stalled write: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no stalled write"
        time.sleep(0.05)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun starts the ranks in sessions of their own
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def rank_keys(run: Path) -> list[list[list[str]]]:
    """Per rank: the key lists of its batches, in step order."""
    return [json.loads((run / f"keys-{r}.json").read_text())["keys"] for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted 2-process run of 6 steps, and one killed (kill -9, both ranks) while writing its step-6
    checkpoint, then resumed from step 3."""
    tmp = tmp_path_factory.mktemp("two")
    corpus = write_corpus(tmp / "corpus", shards=4, per_shard=8)  # 32 images, global batch 8: 4 steps per epoch
    script = tmp / "spy.py"
    script.write_text(textwrap.dedent(SPY.format(tests=str(REPO / "tests"))))
    common = ["data.workers=1", "data.photometric=true", "checkpoint_every=3"]
    full = launch(script, corpus, *common, f"out={tmp / 'full'}", "max_steps=6")
    killed = launch(script, corpus, *common, f"out={tmp / 'split'}", "max_steps=6", **pause_write_env("step-*.pt", 2))
    kill_when_paused(killed, tmp / "split")
    finish(full)
    assert [p.name for p in list_checkpoints(tmp / "split")] == ["step-000000003.pt"]
    assert len((tmp / "split" / "log.jsonl").read_text().splitlines()) == 6  # steps 4-6 ran before the kill
    finish(launch(script, corpus, *common, f"out={tmp / 'split'}", "max_steps=6"))  # resume=latest: from step 3
    return {"corpus": corpus, "full": tmp / "full", "split": tmp / "split"}


def test_killed_and_resumed_equals_uninterrupted_with_two_processes(runs: dict[str, Path]) -> None:
    full, split = runs["full"], runs["split"]
    assert [keys[3:] for keys in rank_keys(full)] == rank_keys(split)  # steps 4-6: the same batches on each rank
    a, b = losses(full), losses(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), (step, a, b)
    assert len({round(v, 4) for v in a.values()}) == 6  # the losses move: the comparison means something
    ckpt = torch.load(list_checkpoints(split)[-1], map_location="cpu", weights_only=True)
    assert ckpt["identity"]["world_size"] == 2 and ckpt["identity"]["global_batch"] == 8


def test_two_process_batches_are_the_simulated_ones(runs: dict[str, Path]) -> None:
    keys = rank_keys(runs["full"])
    real = [keys[0][step] + keys[1][step] for step in range(6)]
    cfg = tiny_config(runs["corpus"])
    sim = measure(
        processes=2, workers=1, shards=4, images_per_shard=8, batch_size=4, shuffle_block=cfg.data.shuffle_buffer,
        checkpoint_every=3, epochs=2, seed=cfg.seed, quiet=True,
    )["_batches"]  # fmt: skip
    names = [f"img_{s:02d}_{i:03d}" for s in range(4) for i in range(8)]
    assert real == [[names[v % 32] for v in row] for row in sim[:6]]
    assert sorted(k for row in real[:4] for k in row) == sorted(names)  # the first epoch: every image once


def test_resume_on_another_process_count_is_refused_or_rescaled(runs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    run = shutil.copytree(runs["full"], tmp_path / "run")
    base = [*TINY_MODEL, "data.workers=1", "data.photometric=true", "checkpoint_every=3", f"out={run}"]
    with pytest.raises(ClaspError) as err:
        train(tiny_config(runs["corpus"], *base, "max_steps=13"))
    line = str(err.value)
    assert "\n" not in line and "world_size was 2, is 1 now" in line and "resume_accept=[world_size]" in line
    assert "step-000000006.pt" in line
    # accepted: 6 steps x 8 images = 48 images seen = step 12 at the new global batch of 4
    summary = train(tiny_config(runs["corpus"], *base, "max_steps=13", "resume_accept=[world_size]"))
    assert summary.step == 13 and summary.global_batch == 4
    ckpt = torch.load(summary.checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["identity"]["world_size"] == 1 and ckpt["identity"]["stream_origin"] == [12, 2]
    assert (run / "config.before-step-000000012.yaml").is_file()


def test_reid_with_two_processes_evaluates_as_with_one(tmp_path: Path) -> None:
    """Evaluation (features gathered across processes in dataset order) gives the 1-process metrics to 1e-6 for
    the same weights (one step at lr 1e-30 with the before-BN feature: the weights stay rank 0's seeded
    initialisation, which DDP broadcasts; ``epochs=0`` is refused since it would evaluate an untrained head).
    Fine-tuning cannot match exactly and is only run: each process normalises its own half batch in the BNNeck
    and mines triplets within it, and augmentations are seeded per rank (seed + rank)."""
    from helpers.transfer_data import reid_overrides, write_market

    write_market(tmp_path / "market" / "Market-1501-v15.09.15")
    common = ["transfer", "reid", "--data", str(tmp_path / "market"), "--dataset", "market1501", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def start(out: str, processes: int, *extra: str) -> subprocess.Popen:
        args = [*common, "--out", str(tmp_path / out), *reid_overrides(), *extra]
        if processes == 1:
            cmd = [sys.executable, "-m", "pipeline.cli", *args]
        else:
            cmd = accelerate_launch("-m", "pipeline.cli", *args)
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    frozen = ("epochs=1", "max_steps_per_epoch=1", "optim.lr=1e-30", "eval.feature=before_bn")
    for proc in [start("one", 1, *frozen), start("two", 2, *frozen), start("tuned", 2)]:
        finish(proc)
    one, two, tuned = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two", "tuned"))
    for key, value in one["metrics"].items():
        if isinstance(value, float):
            assert two["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert two["metrics"]["valid_queries"] == one["metrics"]["valid_queries"] == 4
    assert tuned["training"]["steps"] > 0 and 0 <= tuned["metrics"]["mAP"] <= 1
