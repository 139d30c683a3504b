"""Every registry entry builds and loads, as timm tests its model registry: each backbone architecture runs
without NaNs and survives export -> load unchanged (MoE off and on), and each transfer task resolves from
``transfer.registry.TASKS``, prints a config that loads back, and loads every shipped configs/transfer/*.yaml."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import timm
import torch

import pretrain  # noqa: F401  (registers the CLASP timm models)
from pipeline.config import describe_config, load_config, to_dict
from pretrain.backbone import ARCHS, create_backbone
from pretrain.export import export_backbone, load_backbone
from pretrain.model_config import ModelConfig, MoEConfig
from transfer.backbone import BackboneConfig, build_backbone
from transfer.registry import TASKS, get_task, task_entry
from transfer.task import FineTuneTask, TaskConfig

REPO = Path(__file__).resolve().parents[1]
IMG = (32, 16)
BIG = {"vit_base"}  # ~86M parameters: a 350 MB export round trip, too slow for the default run
MOE = MoEConfig(blocks="last_half", num_experts=2, top_k=1)
SHIPPED = sorted((REPO / "configs" / "transfer").glob("*.yaml"))


def _arch_params() -> list:
    return [pytest.param(a, marks=pytest.mark.slow) if a in BIG else a for a in sorted(ARCHS)]


@pytest.mark.parametrize("moe", [False, True], ids=["plain", "moe"])
@pytest.mark.parametrize("arch", _arch_params())
def test_every_backbone_builds_runs_and_survives_export(arch: str, moe: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    moe_cfg = MOE if moe else MoEConfig(enabled=False)
    net = create_backbone(arch, img_size=IMG, moe=moe_cfg).eval()
    with torch.no_grad():
        for param in net.parameters():  # off the initialisation, so a weight the load skips shows
            param.add_(torch.randn_like(param) * 0.02)
    x = torch.randn(2, 3, *IMG)
    with torch.no_grad():
        tokens = net.forward_features(x, "instance" if moe else None)
    assert torch.isfinite(tokens).all() and tokens.shape[0] == 2

    registered = timm.create_model(f"clasp_{arch}", img_size=IMG, moe=moe_cfg)  # the name builds the same network
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert {k: v.shape for k, v in registered.state_dict().items()} == shapes

    model_cfg = ModelConfig(arch=arch, img_size=IMG, moe=moe_cfg)
    state = {f"teacher.backbone.{k}": v for k, v in net.state_dict().items()}
    torch.save({"model": state, "config": {"model": to_dict(model_cfg)}, "step": 1}, tmp_path / "train.pt")
    out = export_backbone(tmp_path / "train.pt", tmp_path / "export", card={})
    loaded = load_backbone(out)
    expected, got = net.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    with torch.no_grad():
        again = loaded.forward_features(x, "instance") if moe else loaded.forward_features(x)
    assert torch.equal(again, tokens)
    # and the transfer stage reads the export as a task backbone
    backbone = build_backbone(BackboneConfig(spec=str(out), drop_path_rate=0.0), IMG).eval()
    with torch.no_grad():
        feats = backbone(x)
    assert feats.shape == (2, backbone.num_features) and torch.isfinite(feats).all()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_transfer_task_resolves_and_its_printed_config_loads(name: str, tmp_path: Path) -> None:
    task = get_task(name)
    assert task.name == name and callable(task.run)
    assert dataclasses.is_dataclass(task.config) and issubclass(task.config, TaskConfig)
    if isinstance(task, FineTuneTask):
        assert not getattr(type(task), "__abstractmethods__", None)
    config_cls, run = task_entry(name)
    assert config_cls is task.config and type(run.__self__) is type(task)
    printed = describe_config(task.config, title=f"clasp transfer {name}")
    (tmp_path / "printed.yaml").write_text(printed)
    assert to_dict(load_config(task.config, tmp_path / "printed.yaml")) == to_dict(task.config())
    for f in dataclasses.fields(TaskConfig):  # the shared settings keep the help written where they are declared
        line = next(line for line in printed.splitlines() if line.startswith(f"{f.name}:"))
        assert re.search(r"  # [^(\s]", line), f"no help for {f.name}: {line!r}"


def _task_of(path: Path) -> str:
    """The registered task a shipped config belongs to: its file name starts with the task name."""
    matches = [name for name in TASKS if path.stem.startswith(name.replace("-", "_") + "_")]
    assert len(matches) == 1, f"{path.name} names no registered transfer task ({', '.join(TASKS)})"
    return matches[0]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_transfer_config_loads_through_the_registry(path: Path) -> None:
    config_cls, _ = task_entry(_task_of(path))
    cfg = load_config(config_cls, path)
    assert isinstance(cfg, TaskConfig) and isinstance(cfg.backbone, BackboneConfig)


def test_every_trained_task_ships_a_config() -> None:
    shipped = {_task_of(p) for p in SHIPPED}
    assert shipped == set(TASKS) - {"frozen"}  # the frozen read-outs are run with flags alone
