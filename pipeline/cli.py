"""The ``clasp`` command line: one verb per stage.

This is the one module that knows every stage. Stage code is imported inside each command so
``clasp --help`` stays fast. Every command takes ``--config FILE`` plus dotted ``key=value``
overrides; user mistakes (ClaspError) print one line and exit with status 2, Ctrl-C prints one line
and exits with 130, and a failed command leaves no empty output folder behind (pipeline/cli_runtime.py).
``clasp config CMD`` prints every setting of a command with its default and help.

Each stage section below belongs to that stage's maintainer; keep commands thin: parse options (a boolean
option is ``--x/--no-x``, default None = not given), build the stage's config with ``_settings`` (the one
way options meet a config file), call one function of the stage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from pipeline.cli_config import COMMAND_CONFIGS, config_cmd  # noqa: F401  (COMMAND_CONFIGS: read as cli.COMMAND_CONFIGS)
from pipeline.cli_runtime import no_empty_output

app = typer.Typer(
    name="clasp",
    help="CLIP-guided pre-training for human-centric vision: synth, ingest, label, audit, pretrain, transfer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: flags show no value placeholder, examples keep their lines
)

CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML experiment file (overrides the defaults).")
QUIET_OPT = typer.Option(None, "--quiet/--no-quiet", "-q", help="No progress bar or summary lines.")
ROOT_OPT = typer.Option(None, "--root", help="Data root (default: data).")
DEVICE_OPT = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default auto).")


def _overrides(example: str) -> Any:
    return typer.Argument(None, help=f"Dotted key=value settings (all: `clasp config CMD`), e.g. {example}")


def _example(*lines: str) -> str:
    """--help epilog: real commands (\b keeps click from re-wrapping them) and where every setting is listed."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"clasp {version('clasp')}")
        except PackageNotFoundError:
            typer.echo("clasp (not installed: running from a source tree)")
        raise typer.Exit()


@app.callback()
def _root(
    log_level: str = typer.Option(
        None, "--log-level", help="debug | info | warning | error for CLASP and library messages (env CLASP_LOG_LEVEL)."
    ),
    _show_version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """CLASP: label a person corpus with CLIP once, pre-train one backbone, transfer it to every human-centric task."""
    from pipeline.logs import setup_logging

    setup_logging(log_level or os.environ.get("CLASP_LOG_LEVEL") or "warning")


def _settings(cls: type, config: Path | None, overrides: list[str] | None, flags: dict[str, Any] | None = None) -> Any:
    """The one way a command builds its config: defaults <- --config FILE <- key=value overrides <- the options
    given on the command line (``None`` = not given, so ``--no-quiet`` sets false over a file's ``quiet: true``),
    every layer validated like a config file."""
    from pipeline.config import load_config

    return load_config(cls, config, list(overrides or []), flags=flags)


# --- foundation: synthetic world -------------------------------------------------------------
@app.command(epilog=_example("clasp synth --out data/world --identities 40 --preview", "clasp config synth"))
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the synthetic world."),
    identities: int = typer.Option(None, "--identities", "-n", help="Number of identities (default 200)."),
    seed: int = typer.Option(None, "--seed", help="Random seed; output is deterministic for a seed (default 0)."),
    preview: bool | None = typer.Option(
        None, "--preview/--no-preview", help="Also write preview.png (masks, keypoints)."
    ),
    config: Path = CONFIG_OPT,
    overrides: list[str] = _overrides("identities=40 workers=2"),
) -> None:
    """Generate synthetic pedestrians with ground truth in LUPerson/Market-1501/PA-100K layouts."""
    from pipeline.synth import SynthConfig, write_world

    cfg = _settings(SynthConfig, config, overrides, {"identities": identities, "seed": seed, "preview": preview})
    with no_empty_output(out):
        write_world(cfg, out)


# --- stage 0: ingest -------------------------------------------------------------------------
@app.command(
    epilog=_example(
        "clasp ingest --source data/world/luperson --corpus synthetic --images-per-shard 2000", "clasp config ingest"
    )
)
def ingest(
    source: str = typer.Option(None, "--source", "-s", help="Image folder, LMDB (dir or .mdb), or list file."),
    fmt: str = typer.Option(None, "--format", "-f", help="Source format: folder | lmdb | list (default folder)."),
    corpus: str = typer.Option(None, "--corpus", help="Corpus name: writes ROOT/<corpus>/images/."),
    root: str = ROOT_OPT,
    images_per_shard: int = typer.Option(None, "--images-per-shard", help="Images per tar shard (default 10000)."),
    seed: int = typer.Option(None, "--seed", help="Seed of the global shuffle (default 0)."),
    workers: int = typer.Option(None, "--workers", "-j", help="Processes; 0 = all cores (default)."),
    overwrite: bool | None = typer.Option(
        None, "--overwrite/--no-overwrite", help="Replace an ingest made with other settings."
    ),
    quiet: bool | None = QUIET_OPT,
    config: Path = CONFIG_OPT,
    overrides: list[str] = _overrides("full_decode=true"),
) -> None:
    """Pack an image corpus into shuffled, keyed WebDataset shards with a manifest (stage 0)."""
    from pipeline.ingest import IngestConfig
    from pipeline.ingest import ingest as run_ingest

    given = {
        "source": source, "format": fmt, "corpus": corpus, "root": root, "images_per_shard": images_per_shard,
        "seed": seed, "workers": workers, "overwrite": overwrite, "quiet": quiet,
    }  # fmt: skip
    cfg = _settings(IngestConfig, config, overrides, given)
    with no_empty_output(cfg.root, Path(cfg.root) / cfg.corpus if cfg.corpus else None):
        run_ingest(cfg)


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


@app.command(
    epilog=_example(
        "clasp label --corpus synthetic --clip-checkpoint runs/clip --batch-size 32 --device cpu",
        "clasp label --corpus luperson --clip ViT-B-16:openai --store-embeddings",
        "clasp config label",
    )
)
def label(
    corpus: str = typer.Option(
        None, "--corpus", help="Ingested corpus name, ROOT/<corpus>/images/ (default synthetic)."
    ),
    root: str = ROOT_OPT,
    clip: str = typer.Option(None, "--clip", help="open_clip ARCH[:TAG] (default ViT-B-16:openai)."),
    clip_checkpoint: str = typer.Option(None, "--clip-checkpoint", help="clip-train output dir or weights file."),
    allow_random_weights: bool | None = typer.Option(
        None, "--allow-random-weights/--no-allow-random-weights", help="Label with an untrained CLIP (plumbing tests)."
    ),
    parts: str = typer.Option(None, "--parts", help="Part vocabulary YAML (default data_manifests/parts.yaml)."),
    attributes: str = typer.Option(None, "--attributes", help="Attribute vocabulary YAML (default PA-100K's)."),
    resolution: str = typer.Option(None, "--resolution", help="CLIP input HxW (default 2w x w of the CLIP's size)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Images per forward pass (default 64)."),
    workers: int = typer.Option(None, "--workers", "-j", help="DataLoader decode workers (default 2)."),
    device: str = DEVICE_OPT,
    store_embeddings: bool | None = typer.Option(
        None,
        "--store-embeddings/--no-store-embeddings",
        help="Also store each image's CLIP embedding (fp16 clip_embed column, 2 bytes x CLIP width per image; "
        "a new label set) for pre-training with model.loss.distill=true.",
    ),
    quiet: bool | None = QUIET_OPT,
    config: Path = CONFIG_OPT,
    overrides: list[str] = _overrides("fg_threshold=0.4 conf_levels=16"),
) -> None:
    """Label an ingested corpus with CLIP parts and attributes, once, into Parquet shards (stage 1)."""
    from labeling.label import LabelConfig, run_labeling

    given = {
        "corpus": corpus, "root": root, "clip": clip, "clip_checkpoint": clip_checkpoint,
        "allow_random_weights": allow_random_weights, "parts": parts, "attributes": attributes,
        "resolution": _hxw(resolution, "--resolution"), "batch_size": batch_size, "workers": workers,
        "device": device, "with_embed": store_embeddings, "quiet": quiet,
    }  # fmt: skip
    cfg = _settings(LabelConfig, config, overrides, given)
    with no_empty_output(Path(cfg.root) / cfg.corpus / "labels"):
        run_labeling(cfg)


@app.command(
    "clip-train",
    epilog=_example(
        "clasp clip-train --pairs data/world/pairs.csv --out runs/clip --epochs 10 --device cpu",
        "clasp config clip-train",
    ),
)
def clip_train(
    pairs: str = typer.Option(None, "--pairs", help="CSV/Parquet of image,caption rows, or a folder of them."),
    arch: str = typer.Option(None, "--arch", help="open_clip architecture (default clasp-vit-tiny-8)."),
    init: str = typer.Option(None, "--init", help="Fine-tune from ARCH:TAG or a checkpoint path."),
    out: str = typer.Option(None, "--out", "-o", help="Output folder, open_clip local-dir layout (default runs/clip)."),
    epochs: int = typer.Option(None, "--epochs", help="Passes over the pairs (default 10)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Pairs per step (default 128)."),
    workers: int = typer.Option(None, "--workers", "-j", help="DataLoader decode workers (default 2)."),
    device: str = DEVICE_OPT,
    quiet: bool | None = QUIET_OPT,
    config: Path = CONFIG_OPT,
    overrides: list[str] = _overrides("lr=1e-3 time_limit_s=600"),
) -> None:
    """Train or fine-tune an open_clip model on image-caption pairs (e.g. the synthetic world's pairs.csv)."""
    from labeling.clip_train import ClipTrainConfig, train_clip

    given = {
        "pairs": pairs, "arch": arch, "init": init, "out": out, "epochs": epochs, "batch_size": batch_size,
        "workers": workers, "device": device, "quiet": quiet,
    }  # fmt: skip
    cfg = _settings(ClipTrainConfig, config, overrides, given)
    with no_empty_output(cfg.out):
        weights = train_clip(cfg)
    if not cfg.quiet:
        typer.echo(f"CLIP checkpoint: {weights} (use: clasp label --clip-checkpoint {weights.parent})")


# --- stage 1b: audit -------------------------------------------------------------------------
@app.command(
    epilog=_example(
        "clasp audit --corpus synthetic --gt data/world/gt.parquet --out runs/audit",
        "clasp audit --corpus synthetic --fail-on warning      # CI: exit 1 on any warning",
        'clasp audit --corpus synthetic --sql "SELECT shard, count(*) FROM labels GROUP BY shard"',
        "clasp config audit",
    )
)
def audit(
    corpus: str = typer.Option(None, "--corpus", help="Corpus name under ROOT (default synthetic)."),
    root: str = ROOT_OPT,
    labelset: str = typer.Option(None, "--labelset", help="Label set id (default: the latest complete one)."),
    gt: str = typer.Option(None, "--gt", help="Ground truth: gt.parquet of `clasp synth`, or PA-100K annotation.mat."),
    compare: str = typer.Option(None, "--compare", help="A second label set id of the corpus to compare with."),
    out: str = typer.Option(
        None, "--out", "-o", help="Report folder: report.html, summary.json, queries/ (default runs/audit)."
    ),
    sql: str = typer.Option(None, "--sql", help="Run this query over the views (labels, manifest, ...), print, exit."),
    max_rows: int = typer.Option(100, "--max-rows", help="With --sql: rows to print.", show_default=True),
    fail_on: str = typer.Option(
        "error",
        "--fail-on",
        help="Exit 1 when a finding of this level or worse is reported: error | warning | never.",
        show_default=True,
    ),
    quiet: bool | None = QUIET_OPT,
    config: Path = CONFIG_OPT,
    overrides: list[str] = _overrides("mosaics=false threads=4"),
) -> None:
    """Audit label shards with DuckDB: standard checks, ground truth, comparison, HTML report; or ad-hoc --sql."""
    import json

    from labeling.audit import SEVERITIES, AuditConfig, print_table, run_audit, run_sql
    from pipeline.errors import ClaspError

    if fail_on not in (*SEVERITIES[:2], "never"):
        raise ClaspError(f"--fail-on {fail_on!r}: choose error, warning or never")
    given = dict(corpus=corpus, root=root, labelset=labelset, gt=gt, compare=compare, out=out, quiet=quiet)
    cfg = _settings(AuditConfig, config, overrides, given)
    if sql is not None:
        print_table(run_sql(cfg, sql), max_rows=max_rows)
        return
    with no_empty_output(cfg.out):
        report = run_audit(cfg)
    if not cfg.quiet:
        typer.echo(f"audit report: {report}")
    if fail_on != "never":
        levels = SEVERITIES[: SEVERITIES.index(fail_on) + 1]
        findings = json.loads((report.parent / "summary.json").read_text())["findings"]
        failing = [f for f in findings if f["severity"] in levels]
        if failing:
            typer.echo(
                f"audit: {len(failing)} finding(s) at level {fail_on} or worse (--fail-on never: exit 0)", err=True
            )
            raise typer.Exit(1)


# --- stage 2: pre-training -------------------------------------------------------------------
@app.command(
    epilog=_example(
        "clasp pretrain --config configs/pretrain/demo.yaml data.corpus=synthetic out=runs/pretrain/demo",
        "accelerate launch --num_processes 8 -m pipeline.cli pretrain --config configs/pretrain/vit_s_luperson.yaml",
        "clasp config pretrain",
    )
)
def pretrain(
    config: Path = CONFIG_OPT, overrides: list[str] = _overrides("optim.lr=1e-4 model.moe.enabled=false")
) -> None:
    """Pre-train the CLASP backbone; under `accelerate launch` every process runs this same command."""
    from pretrain.config import PretrainConfig

    cfg = _settings(PretrainConfig, config, overrides)
    from pretrain.trainer import train  # after validation: a config error needs no torch import

    with no_empty_output(cfg.out):
        summary = train(cfg)
    if not cfg.quiet:
        typer.echo(f"pretrain: step {summary.step}/{summary.total_steps}, checkpoint {summary.checkpoint}")


@app.command(epilog=_example("clasp export runs/pretrain/demo --out runs/release/demo"))
def export(
    checkpoint: Path = typer.Argument(..., help="Training checkpoint (step-*.pt) or a run directory (its latest)."),
    out: Path = typer.Option(..., "--out", "-o", help="Release directory: model.safetensors, config.json, card."),
) -> None:
    """Export the teacher backbone of a pre-training checkpoint in timm layout (stock timm loads it, MoE off)."""
    from pretrain.export import export_summary
    from pretrain.trainer import export_run

    with no_empty_output(out):
        typer.echo(export_summary(export_run(checkpoint, out)))


# --- stage 3: transfer -----------------------------------------------------------------------


@app.command(
    epilog=_example(
        "clasp transfer reid --data data/world/market1501 --dataset market1501 --backbone runs/release/demo "
        "--out runs/transfer/reid epochs=2",
        "clasp transfer attributes --data data/PA-100K --dataset pa100k --backbone timm:vit_small_patch16_224",
        "clasp config transfer reid",
    )
)
def transfer(
    task: str = typer.Argument(
        ...,
        help="reid, attributes, pose, detection, person-search, parsing, text-search, "
        "or frozen (no-training read-outs: retrieval mAP, ridge mA).",
    ),
    data: Path = typer.Option(None, "--data", "-d", help="Dataset folder in its official layout."),
    dataset: str = typer.Option(None, "--dataset", help="e.g. market1501, msmt17, pa100k, coco, citypersons, lip."),
    backbone: str = typer.Option(
        None,
        "--backbone",
        "-b",
        help="CLASP export folder, timm:NAME, random:ARCH, or pixels:HxW (frozen only: the raw-pixel floor).",
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (results.json, results.md, weights)."),
    quiet: bool | None = QUIET_OPT,
    config: Path = CONFIG_OPT,
    overrides: list[str] = _overrides("epochs=2 optim.lr=0.004"),
) -> None:
    """Fine-tune a backbone on a downstream task and evaluate it with the field's protocol."""
    from transfer.registry import task_entry

    config_cls, run_task = task_entry(task)
    given = {"data_dir": data, "dataset": dataset, "backbone.spec": backbone, "out_dir": out, "quiet": quiet}
    cfg = _settings(config_cls, config, overrides, given)
    with no_empty_output(cfg.out_dir):
        record = run_task(cfg)
    if not cfg.quiet:
        headline = ", ".join(f"{name} {value}" for name, value in list(record.get("headline", {}).items())[:4])
        typer.echo(f"{task}: {headline} (table: {Path(cfg.out_dir) / 'results.md'})")


@app.command(
    epilog=_example(
        "clasp zeroshot --backbone runs/release/distill --data data/world/pa100k --out runs/zeroshot",
        "clasp zeroshot --backbone runs/release/distill --prompts my_attributes.yaml --images photos/ --out runs/zs",
        "clasp config zeroshot",
    )
)
def zeroshot(
    backbone: str = typer.Option(
        None, "--backbone", "-b", help="Export folder of a backbone pre-trained with distill."
    ),
    prompts: str = typer.Option(None, "--prompts", help="Attribute YAML: name, positive, negative (default PA-100K)."),
    data: str = typer.Option(None, "--data", "-d", help="PA-100K-layout folder: evaluate (label-based mA)."),
    images: str = typer.Option(None, "--images", help="Or a folder of images: write scores.csv."),
    out: str = typer.Option(None, "--out", "-o", help="Output folder (results.json, results.md or scores.csv)."),
    quiet: bool | None = QUIET_OPT,
    config: Path = CONFIG_OPT,
    overrides: list[str] = _overrides("compare_clip=false fit_corpus=synthetic"),
) -> None:
    """Attributes by text prompts from an exported backbone, through the text tower of the labels' CLIP."""
    from transfer.zeroshot import ZeroShotConfig, run_zeroshot

    given = {"backbone": backbone, "prompts": prompts, "data": data, "images": images, "out": out, "quiet": quiet}
    cfg = _settings(ZeroShotConfig, config, overrides, given)
    with no_empty_output(cfg.out):
        record = run_zeroshot(cfg)
    if not cfg.quiet and "results" in record:
        typer.echo(", ".join(f"{r['reader']}: mA {r['mA']:.2f}" for r in record["results"].values()))


# --- discoverability --------------------------------------------------------------------------

app.command("config", epilog=_example("clasp config pretrain > my_pretrain.yaml", "clasp config transfer reid"))(
    config_cmd
)


# --- orchestration: demo, ablation -----------------------------------------------------------


@app.command(
    epilog=_example("clasp ablate --config configs/ablation_synthetic.yaml seeds=[0,1]", "clasp config ablate")
)
def ablate(config: Path = CONFIG_OPT, overrides: list[str] = _overrides("seeds=[0,1]")) -> None:
    """Pre-train every variant, transfer each to every task, write the ablation table (resumable)."""
    from pipeline.ablate import AblationConfig, run_ablation

    run_ablation(_settings(AblationConfig, config, overrides))


@app.command(epilog=_example("clasp demo --out runs/demo", "clasp config demo"))
def demo(
    out: Path = typer.Option(
        Path("runs/demo"), "--out", "-o", help="Where the demo writes everything.", show_default=True
    ),
    config: Path = CONFIG_OPT,
    overrides: list[str] = _overrides("seeds=[0]"),
) -> None:
    """The whole pipeline on the built-in synthetic world (offline, CPU, minutes): configs/demo.yaml."""
    from pipeline.ablate import DEMO_CONFIG, AblationConfig, run_ablation

    run_ablation(_settings(AblationConfig, config or DEMO_CONFIG, overrides, {"out": out}))


def main() -> None:
    """The ``clasp`` console script: user mistakes exit 2 with one line, Ctrl-C exits 130 (pipeline.cli_runtime)."""
    from pipeline.cli_runtime import run

    run(app)


if __name__ == "__main__":
    main()
