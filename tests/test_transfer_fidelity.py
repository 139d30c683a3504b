"""Fine-tuning compares like with like: a CLASP export gets the configured stochastic depth, the MoE runs
dropless with a frozen router, and the results record what they were fine-tuned from."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from timm.layers import DropPath

from pipeline.config import to_dict
from pretrain.backbone import create_backbone
from pretrain.export import export_backbone
from pretrain.model_config import ModelConfig, MoEConfig
from transfer.backbone import BackboneConfig, build_backbone


def make_export(tmp_path: Path, moe: bool) -> Path:
    torch.manual_seed(0)
    # trained with a capacity that drops tokens: the fine-tune must not inherit it
    moe_cfg = MoEConfig(enabled=moe, blocks="last_half", capacity_factor=0.5, eval_capacity_factor=0.5)
    model_cfg = ModelConfig(arch="vit_micro", img_size=(32, 16), moe=moe_cfg)
    net = create_backbone(model_cfg.arch, img_size=model_cfg.img_size, moe=model_cfg.moe)
    state = {f"teacher.backbone.{k}": v for k, v in net.state_dict().items()}
    torch.save({"model": state, "config": {"model": to_dict(model_cfg)}, "step": 3}, tmp_path / "train.pt")
    return export_backbone(tmp_path / "train.pt", tmp_path / "backbone", card={})


@pytest.mark.parametrize("moe", [True, False])
def test_an_exported_clasp_backbone_fine_tunes_with_the_configured_drop_path(tmp_path, moe, caplog):
    export = make_export(tmp_path, moe)
    cfg = BackboneConfig(spec=str(export), drop_path_rate=0.2, prompt_mix={"instance": 0.8, "attribute": 0.2})
    with caplog.at_level(logging.WARNING, logger="transfer.backbone"):
        backbone = build_backbone(cfg, (64, 32))  # pre-trained at 32x16
    last = backbone.model.blocks[-1]
    assert isinstance(last.drop_path1, DropPath) and last.drop_path2.drop_prob == pytest.approx(0.2)
    assert backbone.drop_path_rate == pytest.approx(0.2)
    backbone.train()
    x = torch.rand(16, 3, 64, 32)
    torch.manual_seed(1)
    a = backbone(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, backbone(x))  # stochastic depth is live in training
    backbone.eval()
    assert torch.equal(backbone(x), backbone(x))

    record = backbone.provenance()
    assert record["spec"] == str(export) and record["drop_path_rate"] == pytest.approx(0.2)
    assert "32x16" in record["position_embedding"] and "64x32" in record["position_embedding"]
    assert any("resampled" in r.getMessage() for r in caplog.records)
    if moe:
        assert record["moe"]["dispatch"] == "dropless" and record["router"] == "frozen"
        assert record["prompt_mix"] == pytest.approx({"instance": 0.8, "part": 0.0, "attribute": 0.2}, abs=0.01)
        mlp = backbone.model.blocks[-1].mlp
        assert mlp.capacity(1000) == 1000  # dropless, whatever capacity pre-training used
        assert not mlp.router_token.weight.requires_grad and not backbone.model.task_prompts.prompts.requires_grad
        assert mlp.fc1_weight.requires_grad and backbone.prompt_logits.requires_grad
        backbone.train()
        mlp.pop_stats()
        backbone(x).pow(2).sum().backward()
        assert mlp.router_token.weight.grad is None and backbone.prompt_logits.grad is not None
        _, dropped = mlp.pop_stats()
        assert dropped.sum() == 0
    else:
        assert record["moe"] == "off" and record["router"] is None
