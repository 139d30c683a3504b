"""The transfer task interface: the settings every task shares, and the one run skeleton of a fine-tuned task.

A task trained by one loop subclasses ``FineTuneTask`` and fills in data, model, training batches, loss,
evaluation and the results record; ``run`` does the rest the same way for every task: check the folders, return
a finished run's results, build the accelerator, fine-tune with resume, evaluate on every process, write on the
main process. A task with another shape (person search's two stages, the frozen read-outs) implements ``run``
itself on the same pieces. Either way it is registered by one line in ``transfer.registry.TASKS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

from torch import nn

from pipeline.errors import ClaspError
from transfer.backbone import BackboneConfig
from transfer.loop import FineTuneResult, LoopConfig, LossFn, Training, fine_tune, make_accelerator
from transfer.results import finished_results


@dataclass
class TaskConfig:
    """Settings every transfer task shares (the top-level keys; ``clasp transfer`` sets the first four by flag)."""

    data_dir: str = ""  # dataset folder in its official layout (--data)
    dataset: str = ""  # which dataset the folder holds (--dataset)
    out_dir: str = ""  # results.json, results.md, weights and the resume checkpoint (--out)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # --backbone sets backbone.spec
    seed: int = 0  # model init, shuffles and augmentation (each process adds its rank)
    device: str = "auto"  # auto = cuda when available
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast dtype of training and evaluation
    quiet: bool = False  # no progress bars (--quiet)


@dataclass
class FineTuneConfig(LoopConfig, TaskConfig):
    """A task trained by one fine-tune loop: the shared settings plus the loop's (epochs, step cap, optimiser)."""


class Task(Protocol):
    """What the registry hands out: a config class and a ``run`` that writes ``out_dir/results.json``."""

    name: str  # `clasp transfer NAME`
    config: type  # a TaskConfig subclass
    data_hint: str  # what --data names, for the missing-flag error
    datasets: tuple[str, ...]  # the --dataset choices checked up front; () = the reader checks

    def run(self, cfg: Any) -> dict[str, Any]: ...


def start(task: Task, cfg: TaskConfig) -> Path:
    """The output folder, after the checks every task makes first (folders given, a known dataset)."""
    if not cfg.data_dir or not cfg.out_dir:
        raise ClaspError(f"transfer {task.name} needs --data ({task.data_hint}) and --out (output folder)")
    if task.datasets and cfg.dataset not in task.datasets:
        raise ClaspError(
            f"transfer {task.name}: unknown --dataset '{cfg.dataset}'; choose one of {', '.join(task.datasets)}"
        )
    return Path(cfg.out_dir)


C = TypeVar("C", bound=FineTuneConfig)
D = TypeVar("D")


class FineTuneTask(ABC, Generic[C, D]):
    """A downstream task fine-tuned by the shared loop. ``D`` is whatever its dataset reader returns."""

    name: ClassVar[str]  # `clasp transfer NAME`, the progress bar and the resume message
    config: ClassVar[type]  # its FineTuneConfig subclass
    data_hint: ClassVar[str] = "dataset folder"  # what --data names, for the missing-flag error
    datasets: ClassVar[tuple[str, ...]] = ()  # the --dataset choices checked up front; () = the reader checks

    @abstractmethod
    def load_data(self, cfg: C) -> D:
        """Read the dataset (every split the run needs); errors name the file at fault."""

    @abstractmethod
    def build_model(self, cfg: C, data: D) -> nn.Module:
        """Backbone + task head."""

    @abstractmethod
    def prepare(self, cfg: C, data: D, model: nn.Module, accelerator: Any) -> Training:
        """Training batches, optimiser and schedule (most tasks: ``transfer.loop.prepare_training``)."""

    @abstractmethod
    def loss_fn(self, cfg: C, data: D, accelerator: Any) -> LossFn:
        """``loss_fn(model, images, targets) -> {"loss": ..., other named terms}``."""

    @abstractmethod
    def evaluate(self, cfg: C, data: D, model: nn.Module, accelerator: Any) -> Any:
        """Predictions or scores on the evaluation split; runs on every process."""

    @abstractmethod
    def write(self, out: Path, cfg: C, data: D, model: nn.Module, scores: Any, training: FineTuneResult) -> dict:
        """Score (if ``evaluate`` left it), write results (``transfer.results.write_results``); main process only."""

    def make_ema(self, cfg: C, model: nn.Module) -> Any:
        """A weight average kept by the loop and evaluated instead of the final weights; None = none."""
        return None

    def run(self, cfg: C) -> dict[str, Any]:
        """Fine-tune on ``cfg.dataset`` and write results.json / results.md / model.safetensors to ``cfg.out_dir``."""
        out = start(self, cfg)
        finished = finished_results(out, cfg)
        if finished is not None:
            return finished
        data = self.load_data(cfg)
        accelerator, device = make_accelerator(device=cfg.device, mixed_precision=cfg.mixed_precision, seed=cfg.seed)
        training = self.prepare(cfg, data, self.build_model(cfg, data), accelerator)
        ema = self.make_ema(cfg, accelerator.unwrap_model(training.model))  # after prepare: on the training device
        loss_fn = self.loss_fn(cfg, data, accelerator)
        result = fine_tune(
            accelerator, cfg, training, loss_fn=loss_fn, out_dir=out, run_config=cfg, name=self.name, quiet=cfg.quiet,
            ema=ema,
        )  # fmt: skip
        result.device = device
        model = accelerator.unwrap_model(training.model) if ema is None else ema.module
        scores = self.evaluate(cfg, data, model, accelerator)
        record: dict[str, Any] = {}
        if accelerator.is_main_process:
            record = self.write(out, cfg, data, model, scores, result)
        accelerator.wait_for_everyone()
        return record
