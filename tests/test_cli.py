"""How command-line options meet a config file: one way for every command, validated, and able to set false."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeline.cli import app


def _captured(monkeypatch: pytest.MonkeyPatch, target: str) -> dict[str, Any]:
    """Replace the stage function ``module:name`` by one that records the config the command built."""
    module, name = target.split(":")
    seen: dict[str, Any] = {}

    def record(cfg: Any, *args: Any) -> None:
        seen["cfg"] = cfg

    monkeypatch.setattr(f"{module}.{name}", record)
    return seen


@pytest.mark.parametrize(
    ("target", "yaml_text", "args", "expected"),
    [
        ("pipeline.ingest:ingest", "quiet: true\noverwrite: true\n", ["ingest", "--no-quiet", "--no-overwrite"],
         {"quiet": False, "overwrite": False}),
        ("pipeline.ingest:ingest", "quiet: false\n", ["ingest", "-q", "--overwrite"],
         {"quiet": True, "overwrite": True}),
        ("pipeline.ingest:ingest", "quiet: true\n", ["ingest"], {"quiet": True}),  # not given: the file's value
        ("labeling.label:run_labeling", "allow_random_weights: true\nquiet: true\n",
         ["label", "--no-allow-random-weights", "--no-quiet"], {"allow_random_weights": False, "quiet": False}),
        ("pipeline.synth:write_world", "preview: true\n", ["synth", "--out", "{tmp}/w", "--no-preview"],
         {"preview": False}),
    ],
)  # fmt: skip
def test_a_flag_sets_false_over_a_yaml_true(
    target: str, yaml_text: str, args: list[str], expected: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _captured(monkeypatch, target)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml_text + ("root: " + str(tmp_path / "data") + "\n" if "synth" not in args else ""))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(app, [*args, "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert {key: getattr(seen["cfg"], key) for key in expected} == expected


def test_flags_are_validated_like_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An option outside its range is refused by name before the stage starts (it skipped validation once)."""
    from pipeline.config import ConfigError

    seen = _captured(monkeypatch, "pipeline.ingest:ingest")
    result = CliRunner().invoke(app, ["ingest", "--root", str(tmp_path), "--images-per-shard", "0"])
    assert isinstance(result.exception, ConfigError) and "images_per_shard=0" in str(result.exception)
    assert "cfg" not in seen
