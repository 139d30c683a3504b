"""The shared config mechanism: defaults -> YAML -> dotted overrides, with errors that name the key."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from pipeline.config import ConfigError, load_config, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10


@dataclass
class Experiment:
    name: str = "demo"
    seed: int = 0
    resize: tuple[int, int] = (256, 128)
    labelset: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["reid"])
    optim: Optim = field(default_factory=Optim)
    use_moe: bool = True
    precision: Literal["no", "bf16", "fp16"] = "no"


def test_defaults_yaml_then_overrides(tmp_path: Path) -> None:
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("seed: 3\noptim:\n  lr: 0.5\n")
    cfg = load_config(Experiment, cfg_file, ["optim.lr=2e-4", "resize=[384,128]", "labelset=abc123", "use_moe=false"])
    assert cfg.seed == 3  # from the file
    assert cfg.optim.lr == pytest.approx(2e-4)  # override beats the file
    assert cfg.optim.warmup_steps == 10  # default kept inside a partially set group
    assert cfg.resize == (384, 128)
    assert cfg.labelset == "abc123"
    assert cfg.use_moe is False


def test_unknown_key_names_the_closest_valid_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'lr'"):
        load_config(Experiment, None, ["optim.lrr=1"])
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("optim:\n  warmup_step: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.warmup_step.*warmup_steps"):
        load_config(Experiment, cfg_file)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=abc", "seed: expected an integer"),
        ("use_moe=maybe", "use_moe: expected true/false"),
        ("resize=[1,2,3]", "resize: expected 2 values"),
        ("optim=3", "optim: expected a mapping"),
        ("seed", "must look like key=value"),
        ("optim.lr.x=1", "is a value, not a group"),
    ],
)
def test_wrong_values_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Experiment, None, [override])


def test_missing_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Experiment, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Experiment, bad)


def test_saved_config_reloads_identically(tmp_path: Path) -> None:
    cfg = load_config(Experiment, None, ["optim.betas=[0.8,0.9]", "tasks=[reid,attributes]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["optim"]["betas"] == [0.8, 0.9]
    assert load_config(Experiment, path) == cfg
    assert to_dict(cfg)["tasks"] == ["reid", "attributes"]


def test_string_settings_keep_yaml_keywords_as_typed() -> None:
    cfg = load_config(Experiment, None, ["precision=no", "name=on", "labelset=1.0"])
    assert (cfg.precision, cfg.name, cfg.labelset) == ("no", "on", "1.0")
    with pytest.raises(ConfigError, match="precision"):
        load_config(Experiment, None, ["precision=yes"])


def test_relative_config_paths_name_the_shipped_configs_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`clasp pretrain --config configs/pretrain/demo.yaml` works outside the checkout (every command, not only
    the ablation runner); a missing name is still an error naming it."""
    from pretrain.config import PretrainConfig

    monkeypatch.chdir(tmp_path)
    cfg = load_config(PretrainConfig, "configs/pretrain/demo.yaml")
    assert cfg.model.arch == "vit_micro"
    with pytest.raises(ConfigError, match="configs/pretrain/nope.yaml does not exist"):
        load_config(PretrainConfig, "configs/pretrain/nope.yaml")


def test_yaml_no_in_a_file_is_the_word_no(tmp_path: Path) -> None:
    """YAML reads a bare `no` as false; a choice of words gets its word back (mixed_precision: no)."""
    from pretrain.config import PretrainConfig

    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("precision: no\n")
    assert load_config(Experiment, cfg_file).precision == "no"
    cfg_file.write_text("mixed_precision: no\n")
    assert load_config(PretrainConfig, cfg_file).mixed_precision == "no"
    cfg_file.write_text("mixed_precision: yes\n")
    with pytest.raises(ConfigError, match=r"mixed_precision: yes/on/true/y \(YAML's true\) is not one of"):
        load_config(PretrainConfig, cfg_file)


def test_flags_override_the_file_and_can_set_false(tmp_path: Path) -> None:
    """Command-line options arrive as typed values: None = not given; False beats a file's true; validated."""
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("use_moe: true\nseed: 3\n")
    flags = {"use_moe": False, "seed": None, "optim.lr": 0.5, "name": Path("runs/x")}
    cfg = load_config(Experiment, cfg_file, ["seed=4"], flags=flags)
    assert (cfg.use_moe, cfg.seed, cfg.optim.lr, cfg.name) == (False, 4, 0.5, "runs/x")
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'lr'"):
        load_config(Experiment, flags={"optim.lrr": 1.0})
    with pytest.raises(ConfigError, match="seed: expected an integer"):
        load_config(Experiment, flags={"seed": "abc"})
