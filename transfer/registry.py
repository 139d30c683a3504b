"""The transfer tasks ``clasp transfer NAME`` runs: one line per task, ``name: "module:Class"``.

A task class has ``name``, ``config`` (its dataclass; ``transfer.task.TaskConfig`` or a subclass) and
``run(cfg) -> dict``, the results record it wrote to ``out_dir/results.json`` (``transfer.task.Task``).
Modules are imported only when their task is asked for, so ``clasp --help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.errors import ClaspError

if TYPE_CHECKING:  # the task modules import torch: only when a task is asked for
    from transfer.task import Task

TASKS: dict[str, str] = {
    "reid": "transfer.reid.train:ReidTask",
    "attributes": "transfer.attributes.train:AttrTask",
    "pose": "transfer.pose.train:PoseTask",
    "detection": "transfer.detection.train:DetectionTask",
    "person-search": "transfer.person_search.train:PersonSearchTask",
    "parsing": "transfer.parsing.train:ParsingTask",
    "text-search": "transfer.text_search.train:TextSearchTask",
    "frozen": "transfer.frozen:FrozenTask",  # no training: retrieval mAP / ridge attribute read-out of frozen features
}


def get_task(name: str) -> Task:
    """The task registered as ``name`` (an instance of its class)."""
    if name not in TASKS:
        raise ClaspError(f"unknown transfer task '{name}': choose one of {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def task_entry(name: str) -> tuple[type, Callable[[Any], dict[str, Any]]]:
    """(config class, run function) of transfer task ``name``."""
    task = get_task(name)
    return task.config, task.run
