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
    cfg = cli._settings(PretrainConfig, Path("configs/pretrain/demo.yaml"), ["optim.epochs=3"])
    assert cfg.model.arch == "vit_micro" and cfg.optim.epochs == 3
    (tmp_path / "configs" / "pretrain").mkdir(parents=True)  # a file in the working directory wins
    (tmp_path / "configs" / "pretrain" / "demo.yaml").write_text("model:\n  arch: vit_tiny\n")
    assert config_path("configs/pretrain/demo.yaml") == Path("configs/pretrain/demo.yaml")
    assert cli._settings(PretrainConfig, Path("configs/pretrain/demo.yaml"), []).model.arch == "vit_tiny"
    with pytest.raises(ConfigError, match="config file configs/nope.yaml does not exist"):
        cli._settings(PretrainConfig, Path("configs/nope.yaml"), [])


def _install_torch_module():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "tools" / "install_torch.py"
    spec = importlib.util.spec_from_file_location("install_torch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakePip:
    """Stands in for ``python -m pip``: a dry run reports ``offered``; installs are recorded."""

    def __init__(self, offered: dict[str, str]) -> None:
        self.offered, self.installs = offered, []

    def __call__(self, *args: str, check: bool = True):
        import json
        import subprocess

        if "--dry-run" in args:
            report = Path(args[args.index("--report") + 1])
            items = [{"metadata": {"name": name, "version": v}} for name, v in self.offered.items()]
            report.write_text(json.dumps({"install": items}))
        else:
            self.installs.append(args)
        return subprocess.CompletedProcess(args, 0, "", "")


@pytest.mark.parametrize(
    ("offered", "takes_cpu_index"),
    [
        ({"torch": "2.13.0+cpu", "torchvision": "0.28.0"}, False),  # this machine: CPU torch, CUDA torchvision
        ({"torch": "2.14.1", "torchvision": "0.29.1"}, False),  # an index that serves only CUDA builds
        ({"torch": "2.9.1+cpu", "torchvision": "0.24.1+cpu"}, True),  # PyTorch's CPU index
    ],
)
def test_install_torch_takes_the_cpu_index_only_for_a_cpu_pair(
    offered: dict[str, str], takes_cpu_index: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    install_torch = _install_torch_module()
    fake = _FakePip(offered)
    after = {"torch": "2.14.1", "torchvision": "0.29.1", "cuda": "13.0"}
    pairs = iter([None, after])  # nothing importable before, the installed pair after
    monkeypatch.setattr(install_torch, "pip", fake)
    monkeypatch.setattr(install_torch, "installed_pair", lambda: next(pairs))
    monkeypatch.setattr("sys.argv", ["install_torch", "--build", "cpu", "--pins", str(tmp_path / "pins.txt")])
    assert install_torch.main() == 0
    (install,) = fake.installs
    assert ("--index-url" in install) is takes_cpu_index
    assert ("not both CPU builds" in capsys.readouterr().out) is not takes_cpu_index
    assert (tmp_path / "pins.txt").read_text() == "torch==2.14.1\ntorchvision==0.29.1\n"
