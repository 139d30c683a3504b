"""``clasp config CMD``: print every setting of a command with its default and help (registered in pipeline/cli.py)."""

from __future__ import annotations

import typer

COMMAND_CONFIGS = {
    "synth": "pipeline.synth:SynthConfig",
    "ingest": "pipeline.ingest:IngestConfig",
    "label": "labeling.label:LabelConfig",
    "clip-train": "labeling.clip_train:ClipTrainConfig",
    "audit": "labeling.audit:AuditConfig",
    "pretrain": "pretrain.config:PretrainConfig",
    "zeroshot": "transfer.zeroshot:ZeroShotConfig",
    "ablate": "pipeline.ablate:AblationConfig",
    "demo": "pipeline.ablate:AblationConfig",
}


def config_cmd(
    command: str = typer.Argument(..., help=f"{' | '.join(COMMAND_CONFIGS)} | transfer"),
    task: str = typer.Argument(None, help="With transfer: the task (reid, attributes, pose, ...)."),
) -> None:
    """Print every setting of a command with its default and a one-line help, as YAML to copy into --config."""
    import importlib

    from pipeline.config import describe_config
    from pipeline.errors import ClaspError

    if command == "transfer":
        from transfer.registry import TASKS, task_entry

        if task is None:
            raise ClaspError(f"clasp config transfer TASK: name the task, one of {', '.join(TASKS)}")
        cls, title = task_entry(task)[0], f"clasp transfer {task}"
    elif command in COMMAND_CONFIGS:
        module, name = COMMAND_CONFIGS[command].split(":")
        cls, title = getattr(importlib.import_module(module), name), f"clasp {command}"
    else:
        raise ClaspError(f"clasp config {command!r}: no such command; choose {', '.join(COMMAND_CONFIGS)} or transfer")
    values = None
    if command == "demo":  # the demo's defaults are configs/demo.yaml's
        from pipeline.ablate import DEMO_CONFIG
        from pipeline.config import load_config

        values, title = load_config(cls, DEMO_CONFIG), f"{title} (configs/demo.yaml)"
    typer.echo(describe_config(cls, title=title, values=values), nl=False)
