"""A transfer run's outputs: results.json (the record + its config; marks the run complete), results.md (title,
protocol, headline table), config.yaml and the fine-tuned weights."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.config import save_config, to_dict
from pipeline.errors import ClaspError
from pipeline.formats import atomic_path, write_json_atomic
from transfer.loop import CHECKPOINT

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def finished_results(out_dir: Path, cfg: Any) -> dict[str, Any] | None:
    """The results of a completed run with the same config in ``out_dir``; error if its config differs."""
    path = out_dir / RESULTS_JSON
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("config") != json.loads(json.dumps(to_dict(cfg))):
        raise ClaspError(
            f"{out_dir} already holds results of a different configuration; use another --out or delete {path}"
        )
    return record


def save_final_model(out_dir: Path, model: nn.Module) -> None:
    """Fine-tuned weights (whole task model) as model.safetensors."""
    from safetensors.torch import save_model

    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_model(model, str(tmp))


def write_results(
    out_dir: Path,
    cfg: Any,
    record: dict[str, Any],
    *,
    title: str,
    table: list[tuple[str, str]],
) -> dict[str, Any]:
    """Write config.yaml, results.md (title, protocol, table) and, last, results.json (record + config).

    results.json marks the run complete, so the resume checkpoint is deleted after it.
    """
    record = {**record, "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    record["headline"] = dict(table)  # what `clasp transfer` prints when it ends
    record["config"] = json.loads(json.dumps(to_dict(cfg)))
    save_config(cfg, out_dir / "config.yaml")
    lines = [f"# {title}", ""]
    for label in ("protocol", "layout", "backbone", "prompt", "training"):
        if record.get(label):
            lines.append(f"- **{label}**: {_md_value(record[label])}")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in table]
    with atomic_path(out_dir / RESULTS_MD) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    write_json_atomic(out_dir / RESULTS_JSON, record)
    (out_dir / CHECKPOINT).unlink(missing_ok=True)
    return record


def _md_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def pct(value: float) -> str:
    return f"{100.0 * value:.2f}"
