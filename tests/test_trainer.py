"""The pre-training loop: exact resume, non-finite stop, two launched processes, export to stock timm.

Tiny model (``vit_micro`` at 32x16 with 8px patches, a small DINO head) on hand-built shards
(helpers/pretraining.py), a few steps each.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from helpers.launching import accelerate_launch
from helpers.pretraining import REPO, SPY, TINY_MODEL, losses, tiny_config, write_corpus
from typer.testing import CliRunner

from pipeline.cli import app
from pretrain.trainer import NonFiniteLossError, list_checkpoints, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), shards=4, per_shard=8)


def test_stop_and_resume_follows_the_uninterrupted_trajectory(corpus: Path, tmp_path: Path) -> None:
    # 8 steps/epoch; a checkpoint (and a restart of the stream) every 2 steps, mid-epoch
    base = [*TINY_MODEL, "checkpoint_every=2", "data.photometric=true", "data.workers=1"]
    full = train(tiny_config(corpus, *base, f"out={tmp_path / 'full'}", "max_steps=4"))
    assert full.step == 4 and full.steps_per_epoch == 8

    first = train(tiny_config(corpus, *base, f"out={tmp_path / 'split'}", "max_steps=2"))
    assert first.step == 2 and first.checkpoint.name == "step-000000002.pt"
    second = train(tiny_config(corpus, *base, f"out={tmp_path / 'split'}", "max_steps=4"))  # resume=latest
    assert second.step == 4

    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), (step, a, b)
    assert len({round(v, 4) for v in a.values()}) == 4  # the losses move: the comparison means something
    ckpt = torch.load(second.checkpoint, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "step", "config", "scaler", "data"} <= set(ckpt)
    assert ckpt["step"] == 4 and ckpt["config"]["data"]["labelset"] == "testset0001"
    assert (tmp_path / "split" / "config.yaml").is_file()


def test_train_resolves_into_a_copy_and_leaves_the_callers_config_as_it_is(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(corpus, *TINY_MODEL, f"out={out}", "max_steps=1", "model.loss.freeze_last_layer_epochs=0.5")
    before = copy.deepcopy(cfg)
    summary = train(cfg)
    assert cfg == before  # label set, steps per epoch, frozen steps: resolved in the run's own copy
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["data"]["labelset"] is not None and resolved["data"]["steps_per_epoch"] == summary.steps_per_epoch
    assert resolved["model"]["loss"]["freeze_last_layer_steps"] == 4  # 0.5 x 8 steps per epoch


def test_non_finite_loss_stops_with_step_terms_and_last_checkpoint(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(corpus, *TINY_MODEL, f"out={out}", "max_steps=1", "checkpoint_every=1"))
    # std 0 turns every normalised pixel into inf/nan: the next step's loss is not finite
    with pytest.raises(NonFiniteLossError) as err:
        train(
            tiny_config(
                corpus,
                *TINY_MODEL,
                f"out={out}",
                "max_steps=3",
                "checkpoint_every=1",
                "data.std=[0,0,0]",
                "resume_accept=[data.std]",
            )
        )
    message = str(err.value)
    assert "step 2" in message and "dino=" in message and "part=" in message
    assert "step-000000001.pt" in message
    assert [p.name for p in list_checkpoints(out)] == ["step-000000001.pt"]  # nothing written after the failure


def test_export_loads_strict_into_stock_timm(corpus: Path, tmp_path: Path) -> None:
    import timm
    from safetensors.torch import load_file

    out = tmp_path / "run"
    cfg = tiny_config(
        corpus,
        *TINY_MODEL,
        f"out={out}",
        "max_steps=1",
        "model.arch=vit_small",
        "model.img_size=[256,128]",
        "model.patch_size=16",
        "model.moe.enabled=false",
        "data.num_local_crops=0",
        "data.batch_size=2",
    )
    train(cfg)
    result = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "release")])
    assert result.exit_code == 0, result.output
    model = timm.create_model("vit_small_patch16_224", img_size=(256, 128), num_classes=0)
    model.load_state_dict(load_file(str(tmp_path / "release" / "model.safetensors")), strict=True)
    ckpt = torch.load(list_checkpoints(out)[-1], map_location="cpu", weights_only=True)
    assert torch.equal(model.pos_embed, ckpt["model"]["teacher.backbone.pos_embed"])  # the teacher was exported
    config = json.loads((tmp_path / "release" / "config.json").read_text())
    assert config["img_size"] == [256, 128] and config["step"] == 1


def test_two_launched_processes_read_disjoint_data(corpus: Path, tmp_path: Path) -> None:
    script = tmp_path / "spy.py"
    script.write_text(textwrap.dedent(SPY.format(tests=str(REPO / "tests"))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = accelerate_launch(
        str(script), str(corpus), *TINY_MODEL, f"out={tmp_path / 'run'}", "data.workers=1", "max_steps=4"
    )
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "run" / f"keys-{r}.json").read_text()) for r in range(2)]
    keys = [{k for batch in r["keys"] for k in batch} for r in ranks]
    assert all(len(r["keys"]) == 4 and r["step"] == 4 for r in ranks)  # one epoch: 32 images / (4 x 2)
    assert len(keys[0]) == len(keys[1]) == 16 and not keys[0] & keys[1]
    assert ranks[0]["loss"] == pytest.approx(ranks[1]["loss"])  # logged losses are all-reduced
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000000004.pt"]
