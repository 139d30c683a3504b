"""The transfer skeleton: a new task is one FineTuneTask subclass plus one registry line, and `clasp transfer`
runs it (results written, a finished run not redone, an interrupted one resumed); a resumed epoch sees the same
batches as an uninterrupted one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import load_config
from pipeline.errors import ClaspError
from transfer.data import BatchConfig
from transfer.loop import FineTuneResult, LoopConfig, LossFn, Training, prepare_training
from transfer.results import pct, write_results
from transfer.task import FineTuneConfig, FineTuneTask

# --- a seventh task, written the way the README's "Extending CLASP" says --------------------------------------


class Rows(torch.utils.data.Dataset):
    """(features, label, index) rows."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[index], self.y[index], index


@dataclass
class ToyDataConfig(BatchConfig):
    batch_size: int = 4
    workers: int = 0


@dataclass
class ToyConfig(FineTuneConfig):
    dataset: str = "toy"
    epochs: int = 3
    data: ToyDataConfig = field(default_factory=ToyDataConfig)


class ToyTask(FineTuneTask[ToyConfig, tuple[torch.Tensor, torch.Tensor]]):
    name = "toy"
    config = ToyConfig
    datasets = ("toy",)

    def load_data(self, cfg: ToyConfig) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(24, 3, generator=torch.Generator().manual_seed(1))
        return x, (x.sum(dim=1) > 0).long()

    def build_model(self, cfg: ToyConfig, data: Any) -> nn.Module:
        return nn.Linear(3, 2)

    def prepare(self, cfg: ToyConfig, data: Any, model: nn.Module, accelerator: Any) -> Training:
        return prepare_training(accelerator, cfg, cfg.data, model, Rows(*data), seed=cfg.seed, quiet=cfg.quiet)

    def loss_fn(self, cfg: ToyConfig, data: Any, accelerator: Any) -> LossFn:
        return lambda net, x, y: {"loss": F.cross_entropy(net(x), y)}

    def evaluate(self, cfg: ToyConfig, data: Any, model: nn.Module, accelerator: Any) -> float:
        with torch.no_grad():
            return float((model(data[0]).argmax(dim=1) == data[1]).float().mean())

    def write(self, out: Path, cfg: ToyConfig, data: Any, model: nn.Module, scores: float,
              training: FineTuneResult) -> dict[str, Any]:  # fmt: skip
        record = {"task": "toy", "metrics": {"accuracy": scores}, "training": training.record(cfg.epochs)}
        record["history"] = training.history
        return write_results(out, cfg, record, title="Toy", table=[("accuracy", pct(scores))])


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    import transfer.registry

    monkeypatch.setitem(transfer.registry.TASKS, "toy", f"{__name__}:ToyTask")  # the one registry line


def test_a_new_task_runs_through_clasp_transfer(toy_registered: None, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    args = ["transfer", "toy", "--data", str(tmp_path), "--dataset", "toy", "--out", str(tmp_path / "run"), "-q"]
    result = CliRunner().invoke(app, [*args, "device=cpu", "optim.lr=0.1", "optim.warmup_epochs=0"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["training"]["steps"] == 3 * 6 and len(record["history"]) == 3  # 24 rows / 4, 3 epochs
    assert record["training"]["device"] == "cpu" and 0 <= record["metrics"]["accuracy"] <= 1
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    again = CliRunner().invoke(app, [*args, "device=cpu", "optim.lr=0.1", "optim.warmup_epochs=0"])
    assert again.exit_code == 0 and json.loads((tmp_path / "run" / "results.json").read_text()) == record
    wrong = CliRunner().invoke(app, [*args[:4], "--dataset", "other", "--out", str(tmp_path / "x"), "device=cpu"])
    assert isinstance(wrong.exception, ClaspError)  # the console script prints it as one line, exit 2
    assert str(wrong.exception) == "transfer toy: unknown --dataset 'other'; choose one of toy"


def test_an_interrupted_task_resumes_to_the_uninterrupted_result(toy_registered: None, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def cfg(out: Path) -> ToyConfig:
        keys = [f"data_dir={tmp_path}", f"out_dir={out}", "device=cpu", "quiet=true", "optim.warmup_epochs=0"]
        return load_config(ToyConfig, overrides=keys)

    whole = ToyTask().run(cfg(tmp_path / "whole"))
    calls = {"n": 0}
    real_step = torch.optim.SGD.step

    def crash_in_epoch_two(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        calls["n"] += 1
        if calls["n"] > 6 + 2:  # the first epoch is checkpointed, the second dies mid-way
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        ToyTask().run(cfg(tmp_path / "split"))
    monkeypatch.undo()
    resumed = ToyTask().run(cfg(tmp_path / "split"))
    assert resumed["history"][0] == whole["history"][0] | {"images_per_s": resumed["history"][0]["images_per_s"]}
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    assert resumed["metrics"] == whole["metrics"]


def test_a_resumed_epoch_draws_the_same_batches() -> None:
    """prepare_training reseeds the shuffle per epoch: epoch 2 is the same whether epochs 0-1 ran or not."""
    from accelerate import Accelerator

    def epoch_order(epochs_before: int) -> list[int]:
        data = Rows(torch.zeros(12, 1), torch.zeros(12, dtype=torch.long))
        training = prepare_training(
            Accelerator(cpu=True), LoopConfig(epochs=3), ToyDataConfig(), nn.Linear(1, 1), data, seed=5, quiet=True
        )
        for epoch in range(epochs_before):
            training.set_epoch(epoch)
            list(training.loader)
        training.set_epoch(2)
        return [int(i) for _, _, index in training.loader for i in index]

    assert epoch_order(2) == epoch_order(0)
