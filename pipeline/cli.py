"""The ``clasp`` command line: one verb per stage.

This is the one module that knows every stage. Stage code is imported inside each command so
``clasp --help`` stays fast. Every command takes ``--config FILE`` plus dotted ``key=value``
overrides; user mistakes (ClaspError) print one line and exit with status 2.

Each stage section below belongs to that stage's maintainer; keep commands thin: parse options,
build the stage's config, call one function of the stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(
    name="clasp",
    help="CLIP-guided pre-training for human-centric vision: synth, ingest, label, audit, pretrain, transfer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML experiment file (overrides the defaults).")
OVERRIDES_ARG = typer.Argument(None, help="Dotted overrides, e.g. optim.lr=1e-4 model.moe.enabled=false")


@app.callback()
def _root() -> None:
    """CLASP: label a person corpus with CLIP once, pre-train one backbone, transfer it to every human-centric task."""


# --- foundation: synthetic world -------------------------------------------------------------
@app.command()
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the synthetic world."),
    identities: int = typer.Option(None, "--identities", "-n", help="Number of identities."),
    seed: int = typer.Option(None, "--seed", help="Random seed (output is deterministic for a seed)."),
    preview: bool = typer.Option(False, "--preview", help="Also write preview.png (masks + keypoints)."),
    config: Path = CONFIG_OPT,
    overrides: list[str] = OVERRIDES_ARG,
) -> None:
    """Generate synthetic pedestrians with ground truth in LUPerson/Market-1501/PA-100K layouts."""
    from pipeline.config import load_config
    from pipeline.synth import SynthConfig, write_world

    overrides = list(overrides or [])
    if identities is not None:
        overrides.append(f"identities={identities}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    if preview:
        overrides.append("preview=true")
    cfg = load_config(SynthConfig, config, overrides)
    write_world(cfg, out)


# --- stage 0: ingest -------------------------------------------------------------------------
@app.command()
def ingest(
    source: str = typer.Option(None, "--source", "-s", help="Image folder, LMDB (dir or .mdb), or list file."),
    fmt: str = typer.Option(None, "--format", "-f", help="Source format: folder | lmdb | list (default folder)."),
    corpus: str = typer.Option(None, "--corpus", help="Corpus name: writes ROOT/<corpus>/images/."),
    root: str = typer.Option(None, "--root", help="Data root (default: data)."),
    images_per_shard: int = typer.Option(None, "--images-per-shard", help="Images per tar shard (default 10000)."),
    seed: int = typer.Option(None, "--seed", help="Seed of the global shuffle (default 0)."),
    workers: int = typer.Option(None, "--workers", "-j", help="Processes; 0 = all cores (default)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an ingest made with other settings."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    config: Path = CONFIG_OPT,
    overrides: list[str] = OVERRIDES_ARG,
) -> None:
    """Pack an image corpus into shuffled, keyed WebDataset shards with a manifest (stage 0)."""
    import dataclasses

    from pipeline.config import load_config
    from pipeline.ingest import IngestConfig
    from pipeline.ingest import ingest as run_ingest

    cfg = load_config(IngestConfig, config, overrides)
    given = {
        "source": source, "format": fmt, "corpus": corpus, "root": root, "images_per_shard": images_per_shard,
        "seed": seed, "workers": workers, "overwrite": overwrite or None, "quiet": quiet or None,
    }  # fmt: skip
    run_ingest(dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None}))


# --- stage 1: labeling -----------------------------------------------------------------------
def _hxw(value: str | None, flag: str) -> tuple[int, int] | None:
    from pipeline.errors import ClaspError

    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise ClaspError(f"{flag} {value!r}: expected HxW, e.g. 448x224") from None
    return (h, w)


@app.command()
def label(
    corpus: str = typer.Option(None, "--corpus", help="Ingested corpus name (ROOT/<corpus>/images/)."),
    root: str = typer.Option(None, "--root", help="Data root (default: data)."),
    clip: str = typer.Option(None, "--clip", help="open_clip ARCH[:TAG] (default ViT-B-16:openai)."),
    clip_checkpoint: str = typer.Option(None, "--clip-checkpoint", help="clip-train output dir or weights file."),
    allow_random_weights: bool = typer.Option(
        False, "--allow-random-weights", help="Label with an untrained CLIP (meaningless labels; plumbing tests)."
    ),
    parts: str = typer.Option(None, "--parts", help="Part vocabulary YAML (default data_manifests/parts.yaml)."),
    attributes: str = typer.Option(None, "--attributes", help="Attribute vocabulary YAML (default PA-100K's)."),
    resolution: str = typer.Option(None, "--resolution", help="CLIP input HxW (default 2w x w of the CLIP's size)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Images per forward pass."),
    workers: int = typer.Option(None, "--workers", "-j", help="DataLoader decode workers."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    config: Path = CONFIG_OPT,
    overrides: list[str] = OVERRIDES_ARG,
) -> None:
    """Label an ingested corpus with CLIP parts and attributes, once, into Parquet shards (stage 1)."""
    import dataclasses

    from labeling.label import LabelConfig, run_labeling
    from pipeline.config import load_config

    cfg = load_config(LabelConfig, config, overrides)
    given = {
        "corpus": corpus, "root": root, "clip": clip, "clip_checkpoint": clip_checkpoint,
        "allow_random_weights": allow_random_weights or None, "parts": parts, "attributes": attributes,
        "resolution": _hxw(resolution, "--resolution"), "batch_size": batch_size, "workers": workers,
        "device": device, "quiet": quiet or None,
    }  # fmt: skip
    run_labeling(dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None}))


@app.command("clip-train")
def clip_train(
    pairs: str = typer.Option(None, "--pairs", help="CSV/Parquet of image,caption rows, or a folder of them."),
    arch: str = typer.Option(None, "--arch", help="open_clip architecture (default clasp-vit-tiny-8)."),
    init: str = typer.Option(None, "--init", help="Fine-tune from ARCH:TAG or a checkpoint path."),
    out: str = typer.Option(None, "--out", "-o", help="Output folder (open_clip local-dir layout)."),
    epochs: int = typer.Option(None, "--epochs", help="Passes over the pairs."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Pairs per step."),
    workers: int = typer.Option(None, "--workers", "-j", help="DataLoader decode workers."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-epoch lines."),
    config: Path = CONFIG_OPT,
    overrides: list[str] = OVERRIDES_ARG,
) -> None:
    """Train or fine-tune an open_clip model on image-caption pairs (e.g. the synthetic world's pairs.csv)."""
    import dataclasses

    from labeling.clip_train import ClipTrainConfig, train_clip
    from pipeline.config import load_config

    cfg = load_config(ClipTrainConfig, config, overrides)
    given = {
        "pairs": pairs, "arch": arch, "init": init, "out": out, "epochs": epochs, "batch_size": batch_size,
        "workers": workers, "device": device, "quiet": quiet or None,
    }  # fmt: skip
    weights = train_clip(dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None}))
    if not quiet:
        typer.echo(f"CLIP checkpoint: {weights} (use: clasp label --clip-checkpoint {weights.parent})")


# --- stage 1b: audit -------------------------------------------------------------------------
@app.command()
def audit(
    corpus: str = typer.Option(None, "--corpus", help="Corpus name under ROOT."),
    root: str = typer.Option(None, "--root", help="Data root (default: data)."),
    labelset: str = typer.Option(None, "--labelset", help="Label set id (default: the latest complete one)."),
    gt: str = typer.Option(None, "--gt", help="Ground truth: gt.parquet of `clasp synth`, or PA-100K annotation.mat."),
    compare: str = typer.Option(None, "--compare", help="A second label set id of the corpus to compare with."),
    out: str = typer.Option(None, "--out", "-o", help="Output directory (report.html, summary.json, queries/)."),
    sql: str = typer.Option(None, "--sql", help="Run this query over the views (labels, manifest, ...), print, exit."),
    max_rows: int = typer.Option(100, "--max-rows", help="With --sql: rows to print."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary."),
    config: Path = CONFIG_OPT,
    overrides: list[str] = OVERRIDES_ARG,
) -> None:
    """Audit label shards with DuckDB: standard checks, ground truth, comparison, HTML report; or ad-hoc --sql."""
    import dataclasses

    from labeling.audit import AuditConfig, print_table, run_audit, run_sql
    from pipeline.config import load_config

    cfg = load_config(AuditConfig, config, overrides)
    given = dict(corpus=corpus, root=root, labelset=labelset, gt=gt, compare=compare, out=out, quiet=quiet or None)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    if sql is not None:
        print_table(run_sql(cfg, sql), max_rows=max_rows)
        return
    report = run_audit(cfg)
    if not cfg.quiet:
        typer.echo(f"audit report: {report}")


# --- stage 2: pre-training -------------------------------------------------------------------
@app.command()
def pretrain(config: Path = CONFIG_OPT, overrides: list[str] = OVERRIDES_ARG) -> None:
    """Pre-train the CLASP backbone; under `accelerate launch` every process runs this same command."""
    from pipeline.config import load_config
    from pretrain.config import PretrainConfig

    cfg = load_config(PretrainConfig, config, list(overrides or []))
    from pretrain.trainer import train  # after validation: a config error needs no torch import

    summary = train(cfg)
    if not cfg.quiet:
        typer.echo(f"pretrain: step {summary.step}/{summary.total_steps}, checkpoint {summary.checkpoint}")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Training checkpoint (step-*.pt) or a run directory (its latest)."),
    out: Path = typer.Option(..., "--out", "-o", help="Release directory: model.safetensors, config.json, card."),
) -> None:
    """Export the teacher backbone of a pre-training checkpoint in timm layout (stock timm loads it, MoE off)."""
    from pretrain.export import export_summary
    from pretrain.trainer import export_run

    typer.echo(export_summary(export_run(checkpoint, out)))


# --- stage 3: transfer -----------------------------------------------------------------------


@app.command()
def transfer(
    task: str = typer.Argument(..., help="reid, attributes, pose, detection, person-search or parsing."),
    data: Path = typer.Option(None, "--data", "-d", help="Dataset folder in its official layout."),
    dataset: str = typer.Option(None, "--dataset", help="e.g. market1501, msmt17, pa100k, coco, citypersons, lip."),
    backbone: str = typer.Option(None, "--backbone", "-b", help="CLASP export folder, timm:NAME or random:ARCH."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (results.json, results.md, weights)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    config: Path = CONFIG_OPT,
    overrides: list[str] = OVERRIDES_ARG,
) -> None:
    """Fine-tune a backbone on a downstream task and evaluate it with the field's protocol."""
    from pipeline.config import load_config
    from transfer.common import task_entry

    config_cls, run_task = task_entry(task)
    options = {"data_dir": data, "dataset": dataset, "backbone.spec": backbone, "out_dir": out, "quiet": quiet or None}
    extra = [f"{key}={value}" for key, value in options.items() if value is not None]
    run_task(load_config(config_cls, config, list(overrides or []) + extra))


# --- orchestration: demo, ablation -----------------------------------------------------------


@app.command()
def ablate(config: Path = CONFIG_OPT, overrides: list[str] = OVERRIDES_ARG) -> None:
    """Pre-train every variant, transfer each to every task, write the ablation table (resumable)."""
    from pipeline.ablate import AblationConfig, run_ablation

    run_ablation(_load_config(AblationConfig, config, overrides))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Where the demo writes everything."),
    config: Path = CONFIG_OPT,
    overrides: list[str] = OVERRIDES_ARG,
) -> None:
    """The whole pipeline on the built-in synthetic world (offline, CPU, minutes): configs/demo.yaml."""
    from pipeline.ablate import DEMO_CONFIG, AblationConfig, run_ablation

    run_ablation(_load_config(AblationConfig, config or DEMO_CONFIG, [*(overrides or []), f"out={out}"]))


def _load_config(cls: type, config: Path | None, overrides: list[str] | None) -> object:
    from pipeline.config import load_config
    from pipeline.resources import config_path

    return load_config(cls, config_path(config) if config else None, list(overrides or []))


def main() -> None:
    from pipeline.errors import ClaspError

    try:
        app()
    except ClaspError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
