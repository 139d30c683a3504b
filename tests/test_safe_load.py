"""Resume states load with ``weights_only=True``: plain states round-trip, a crafted one is refused unrun."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from labeling.clip_train import STATE_FILE, ClipTrainConfig, _maybe_resume, _save_state
from pipeline.errors import ClaspError
from transfer.loop import CHECKPOINT, load_checkpoint


class _RunsCode:
    """A pickled object whose unpickling calls ``os.system`` (what a crafted state file would hold)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _trained_pair() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_clip_train_state_round_trips_through_a_weights_only_load(tmp_path: Path) -> None:
    model, optimizer = _trained_pair()
    _save_state(tmp_path, model, optimizer, 2, [{"epoch": 1, "loss": 0.5, "images_per_s": 10.0}])
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    epoch, history = _maybe_resume(tmp_path, ClipTrainConfig(), fresh, fresh_opt)
    assert epoch == 2 and history[0]["loss"] == 0.5
    assert torch.equal(fresh.weight, model.weight) and fresh_opt.state_dict()["state"][0]["step"] == 1


def test_clip_train_refuses_a_state_that_would_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "epoch": _RunsCode(marker)}, tmp_path / STATE_FILE)
    model, optimizer = _trained_pair()
    with pytest.raises(ClaspError, match=f"{STATE_FILE} is not a readable clip-train resume state.*delete it"):
        _maybe_resume(tmp_path, ClipTrainConfig(), model, optimizer)
    assert not marker.exists()


def test_transfer_refuses_a_checkpoint_that_would_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"config": {}, "history": [_RunsCode(marker)]}, tmp_path / CHECKPOINT)
    refusal = rf"{CHECKPOINT} is not a readable transfer resume state \(it names posix\.system"
    with pytest.raises(ClaspError, match=refusal):
        load_checkpoint(tmp_path, {})
    assert not marker.exists()


def test_transfer_checkpoint_that_is_not_a_dict_is_refused(tmp_path: Path) -> None:
    torch.save([1, 2], tmp_path / CHECKPOINT)
    with pytest.raises(ClaspError, match="holds a list"):
        load_checkpoint(tmp_path, {})
