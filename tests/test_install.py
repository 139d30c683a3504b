"""Shipped files (configs/, data_manifests/) are found from any working directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import cli
from pipeline.ablate import DEMO_CONFIG, AblationConfig, repo_path
from pipeline.config import ConfigError, load_config
from pipeline.resources import SHIPPED_DIRS, SHIPPED_ROOT, config_path
from pipeline.vocab import DEFAULT_ATTRIBUTES, DEFAULT_PARTS, load_attributes, load_parts
from pretrain.config import PretrainConfig


def test_shipped_folders_are_found_from_another_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert all((SHIPPED_ROOT / name).is_dir() for name in SHIPPED_DIRS)
    assert DEFAULT_ATTRIBUTES.is_file() and DEFAULT_PARTS.is_file()
    assert len(load_attributes().attributes) == 26 and load_parts().names[0] == "background"
    demo = load_config(AblationConfig, DEMO_CONFIG)
    assert load_config(PretrainConfig, repo_path(demo.pretrain_config)).model.arch == "vit_micro"


def test_cli_config_paths_fall_back_to_the_shipped_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = cli._load_config(PretrainConfig, Path("configs/pretrain/demo.yaml"), ["optim.epochs=3"])
    assert cfg.model.arch == "vit_micro" and cfg.optim.epochs == 3
    (tmp_path / "configs" / "pretrain").mkdir(parents=True)  # a file in the working directory wins
    (tmp_path / "configs" / "pretrain" / "demo.yaml").write_text("model:\n  arch: vit_tiny\n")
    assert config_path("configs/pretrain/demo.yaml") == Path("configs/pretrain/demo.yaml")
    assert cli._load_config(PretrainConfig, Path("configs/pretrain/demo.yaml"), []).model.arch == "vit_tiny"
    with pytest.raises(ConfigError, match="config file configs/nope.yaml does not exist"):
        cli._load_config(PretrainConfig, Path("configs/nope.yaml"), [])
