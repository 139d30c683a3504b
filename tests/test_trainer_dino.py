"""DINO as DINO does it: per-parameter gradient clipping, the frozen last layer in epochs, and the loop's
checks (a loss term with no valid target is reported once)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from helpers.pretraining import TINY_MODEL, tiny_config, write_corpus

import pretrain.meta_arch as meta_arch
import pretrain.trainer as trainer
from pipeline.errors import ClaspError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), shards=4, per_shard=8)


def test_gradients_are_clipped_per_parameter_tensor():
    big, small = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    big.grad = torch.tensor([300.0, 0.0, 0.0, 0.0])
    small.grad = torch.tensor([0.6, 0.8, 0.0])  # norm 1: under the limit, left as it is
    frozen = torch.nn.Parameter(torch.zeros(2))  # no gradient: skipped
    norm = trainer.clip_grads_per_param([big, small, frozen], 3.0)
    assert norm.item() == pytest.approx((300.0**2 + 1.0) ** 0.5)  # the norm before clipping, for the log
    assert big.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    # a global clip would have scaled the small gradient by 3/300 too
    assert torch.equal(small.grad, torch.tensor([0.6, 0.8, 0.0]))


def test_the_trainer_clips_per_parameter_after_cancelling_the_frozen_last_layer(corpus, tmp_path, monkeypatch):
    seen = []
    original = trainer.clip_grads_per_param

    def spy(parameters, max_norm):
        parameters = list(parameters)
        named = {id(p): n for n, p in meta_arch_model[0].named_parameters()}
        seen.append({named[id(p)] for p in parameters if p.grad is not None})
        return original(parameters, max_norm)

    meta_arch_model = []
    original_init = meta_arch.ClaspMetaArch.__init__

    def keep(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        meta_arch_model.append(self)

    monkeypatch.setattr(trainer, "clip_grads_per_param", spy)
    monkeypatch.setattr(meta_arch.ClaspMetaArch, "__init__", keep)
    cfg = tiny_config(
        corpus, *TINY_MODEL, f"out={tmp_path / 'run'}", "max_steps=2", "model.loss.freeze_last_layer_steps=1"
    )
    trainer.train(cfg)
    assert len(seen) == 2
    assert not any("last_layer" in n for n in seen[0])  # cancelled before clipping: not part of it
    assert any("last_layer" in n for n in seen[1])


def test_freeze_last_layer_in_epochs_becomes_steps(corpus, tmp_path):
    out = tmp_path / "run"
    # 32 images / batch 4 = 8 steps per epoch
    trainer.train(
        tiny_config(corpus, *TINY_MODEL, f"out={out}", "max_steps=1", "model.loss.freeze_last_layer_epochs=0.5")
    )
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["loss"]["freeze_last_layer_steps"] == 4
    both = ["model.loss.freeze_last_layer_epochs=1", "model.loss.freeze_last_layer_steps=3"]
    with pytest.raises(ClaspError, match="both set"):
        trainer.train(tiny_config(corpus, *TINY_MODEL, f"out={tmp_path / 'other'}", "max_steps=1", *both))


def test_a_loss_term_without_valid_targets_is_warned_about_once(corpus, tmp_path, monkeypatch, caplog):
    # every part cell under the confidence threshold: the part loss is exactly 0 (the synthetic run)
    original = meta_arch.part_loss
    monkeypatch.setattr(meta_arch, "part_loss", lambda logits, part_map, part_conf, **kw: original(
        logits, part_map, part_conf * 0.0, **kw))  # fmt: skip
    monkeypatch.setattr(trainer, "ZERO_LOSS_WARN_STEPS", 2)
    with caplog.at_level(logging.WARNING, logger="pretrain.trainer"):
        trainer.train(tiny_config(corpus, *TINY_MODEL, f"out={tmp_path / 'run'}", "max_steps=4"))
    warned = [r.getMessage() for r in caplog.records if "exactly 0" in r.getMessage()]
    assert len(warned) == 1 and "loss/part" in warned[0] and "step 2" in warned[0], warned


def test_router_statistics_per_prompt_in_the_log_and_tensorboard(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    over = [o for o in TINY_MODEL if o != "tensorboard=false"]
    trainer.train(tiny_config(corpus, *over, f"out={out}", "max_steps=2", "tensorboard=true"))
    row = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    for prompt in ("instance", "part", "attribute"):
        shares = [row[f"moe/{prompt}/expert_share/{i}"] for i in range(4)]
        assert sum(shares) == pytest.approx(1.0) and row[f"moe/{prompt}/dropped_frac"] == 0.0
    assert not any(k.startswith("moe/mix/") for k in row)  # no mixed prompt in pre-training
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"moe/instance/expert_share/0", "moe/part/dropped_frac"} <= set(events.Tags()["scalars"])
