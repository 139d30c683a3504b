"""benchmarks/gpu_ablation.sh: its config loads (--dry-run, fast) and the whole run works at TINY=1 on CPU (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ablate import AblationConfig
from pipeline.config import load_config

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_ablation.sh"


def _run(tmp_path: Path, *args: str, tiny: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TINY": "1" if tiny else "0", "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=1500)


@pytest.mark.parametrize("tiny", [False, True])
def test_dry_run_writes_a_loadable_config_with_every_variant(tmp_path: Path, tiny: bool) -> None:
    done = _run(tmp_path, "--dry-run", tiny=tiny)
    assert done.returncode == 0, done.stderr
    cfg = load_config(AblationConfig, tmp_path / "out" / "config.yaml")
    names = [v.name for v in cfg.variants]
    assert {"raw_pixels", "random_init", "dino_only", "clasp", "gt_labels"} <= set(names)
    assert sum(n.startswith("gt_labels_noise_") for n in names) >= 3
    assert {t.task for t in cfg.transfers} == {"frozen"}
    assert not (tmp_path / "out" / "world").exists()  # nothing ran
    assert ("vit_small_conv" in " ".join(cfg.pretrain_overrides)) is not tiny
    assert _run(tmp_path, "--bogus", tiny=tiny).returncode == 2


@pytest.mark.slow
def test_tiny_run_prints_the_table(tmp_path: Path) -> None:
    done = _run(tmp_path, tiny=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"raw_pixels", "gt_labels", "gt_labels_noise_0.4"} <= set(last["table"])
    assert set(last["label_quality"]) >= {"clasp", "gt_labels", "gt_labels_noise_0.1"}
    assert (tmp_path / "out" / "results.png").stat().st_size > 0
