"""The whole pipeline as one resumable run: the paper's ablation table, and `make demo`.

    clasp ablate --config configs/ablation_synthetic.yaml      # make ablation
    clasp demo --out runs/demo                                  # make demo (configs/demo.yaml)

Steps: synthetic world -> ingest -> clip-train -> label -> audit -> pre-train each variant
(and seed) -> export -> fine-tune every variant on every transfer task -> results table
(Markdown + JSON + plot). Every step is skipped when its complete output already exists for
the same resolved config (variant and transfer folders are named by a hash of their config),
so an interrupted run continues where it stopped. On real data, point ``corpus`` at an ingested
corpus and each transfer at a real dataset folder; the same command runs on GPUs.

This module sits on top of the stages (like the CLI); nothing imports it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.ablate_checks import DEFAULT_MARGINS, check_instrument, checks_markdown
from pipeline.ablate_report import column, markdown_table, plot_results
from pipeline.config import load_config, save_config, to_dict
from pipeline.errors import ClaspError
from pipeline.formats import write_json_atomic
from pipeline.resources import SHIPPED_ROOT, config_path


@dataclass
class Variant:
    """One pre-training variant: ``pretrain: false`` means random init (no pre-training)."""

    name: str = "clasp"
    pretrain: bool = True
    overrides: list[str] = field(default_factory=list)  # dotted PretrainConfig overrides
    # clip: the CLIP label set; gt: the synthetic world's ground truth in the same format (labeling.oracle),
    # the upper bound that tells label quality apart from the method
    labels: Literal["clip", "gt"] = "clip"
    # gt labels degraded on purpose (labeling.oracle): attribute flip rate and part-map noise level, for the
    # dose-response; each such set is audited against the truth so its quality is measured, not assumed
    attr_flip: float = 0.0
    part_noise: float = 0.0
    # a fixed backbone spec instead of pre-training (e.g. pixels:16x8, the raw-pixel floor); only the tasks
    # that can read it run (`frozen` for pixels:HxW)
    backbone: str | None = None
    seeds: list[int] | None = None  # this variant's seeds instead of the run's (e.g. more seeds for the controls)


@dataclass
class TransferRun:
    task: str = "reid"  # a transfer.registry.TASKS name
    dataset: str = "market1501"
    data: str = "market1501"  # dataset folder; relative paths are inside the synthetic world
    metric: str = "mAP"  # the headline number for the table (a key of the task's results)
    overrides: list[str] = field(default_factory=list)  # dotted overrides of the task's config


@dataclass
class AblationConfig:
    out: str = "runs/ablation"
    # input corpus: the synthetic world is generated unless `root`/`corpus` point at an ingested one
    synth_overrides: list[str] = field(default_factory=lambda: ["identities=120"])
    root: str | None = None  # an existing data root with an ingested corpus; None = ingest the world
    corpus: str = "synthetic"
    images_per_shard: int = 256
    # CLIP for labels: train a small one on the world's captions, or use an existing model
    clip_train_overrides: list[str] = field(default_factory=list)
    clip: str | None = None  # ARCH[:TAG] to label with instead of training one (e.g. ViT-B-16:openai)
    label_overrides: list[str] = field(default_factory=list)
    audit: bool = True
    # pre-training
    pretrain_config: str = "configs/pretrain/demo.yaml"
    pretrain_overrides: list[str] = field(default_factory=list)  # applied to every variant
    variants: list[Variant] = field(
        default_factory=lambda: [
            Variant(name="random_init", pretrain=False),
            Variant(name="dino_only", overrides=["model.loss.part=false", "model.loss.attribute=false"]),
            Variant(name="clasp", overrides=[]),
        ]
    )
    transfers: list[TransferRun] = field(
        default_factory=lambda: [
            TransferRun(task="reid", dataset="market1501", data="market1501", metric="mAP"),
            TransferRun(task="attributes", dataset="pa100k", data="pa100k", metric="mA"),
        ]
    )
    seeds: list[int] = field(default_factory=lambda: [0])
    # positive control (pipeline.ablate_checks): least gain of gt_labels over random_init, per metric name
    control_margins: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MARGINS))
    quiet: bool = True  # stage progress bars off; the runner prints one line per step


REPO_DIR = SHIPPED_ROOT  # the checkout, or an installed copy of configs/ (pipeline.resources)
DEMO_CONFIG = REPO_DIR / "configs" / "demo.yaml"


def repo_path(path: str) -> str:
    """A relative config path that does not exist from the working directory is looked up in the repo."""
    return str(config_path(path))


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


class _Log:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {msg}", flush=True)


def _prepare_corpus(cfg: AblationConfig, out: Path, log: _Log) -> tuple[Path, Path | None]:
    """(data root, synthetic world dir or None) with the corpus ingested."""
    if cfg.root is not None:
        return Path(cfg.root), None
    from pipeline.ingest import IngestConfig, ingest
    from pipeline.synth import SynthConfig, write_world

    world = out / "world"
    if not (world / "world.json").is_file():
        log("synth: generating the synthetic world")
        write_world(load_config(SynthConfig, None, [*cfg.synth_overrides, "quiet=true", "overwrite=true"]), world)
    root = out / "data"
    summary = ingest(
        IngestConfig(
            source=str(world / "luperson"),
            format="folder",
            corpus=cfg.corpus,
            root=str(root),
            images_per_shard=cfg.images_per_shard,
            quiet=True,
        )
    )
    log(f"ingest: {summary.images} images in {summary.shards} shards under {root}")
    return root, world


def _label(cfg: AblationConfig, out: Path, root: Path, world: Path | None, log: _Log) -> str:
    from labeling.label import LabelConfig, run_labeling

    extra = [f"root={root}", f"corpus={cfg.corpus}", f"quiet={str(cfg.quiet).lower()}"]
    if cfg.clip is not None:
        extra.append(f"clip={cfg.clip}")
    else:
        from labeling.clip_train import ClipTrainConfig, train_clip

        if world is None:
            raise ClaspError("ablation: set `clip` (ARCH[:TAG]) when using an existing corpus without captions")
        clip_cfg = load_config(
            ClipTrainConfig,
            None,
            [f"pairs={world / 'pairs.csv'}", f"out={out / 'clip'}", "quiet=true", *cfg.clip_train_overrides],
        )
        ckpt = train_clip(clip_cfg)
        log(f"clip-train: {ckpt}")
        extra += [f"clip={clip_cfg.arch}", f"clip_checkpoint={ckpt}"]
    if any("model.loss.distill=true" in [*v.overrides, *cfg.pretrain_overrides] for v in cfg.variants):
        extra.append("with_embed=true")  # a distillation variant needs the CLIP embeddings in the label set
    labelset = run_labeling(load_config(LabelConfig, None, [*cfg.label_overrides, *extra])).labelset
    log(f"label: label set {labelset}")
    return labelset


def _audit(cfg: AblationConfig, out: Path, root: Path, world: Path | None, labelset: str, log: _Log) -> Path:
    from labeling.audit import AuditConfig, run_audit

    gt = str(world / "gt.parquet") if world is not None else None
    report = run_audit(AuditConfig(root=str(root), corpus=cfg.corpus, labelset=labelset, gt=gt, out=str(out / "audit")))
    log(f"audit: {report}")
    return report


def _label_quality(out: Path, root: Path, corpus: str, labelset: str, world: Path) -> dict[str, float]:
    """Attribute mA and part mIoU of a label set against the world's truth (`clasp audit --gt`), cached per set."""
    from labeling.audit import AuditConfig, run_audit

    audit_dir = out / "audit" if labelset_is_clip(labelset) else out / "audit-gt" / labelset
    summary = audit_dir / "summary.json"
    if not summary.is_file() or json.loads(summary.read_text()).get("labelset") != labelset:
        run_audit(AuditConfig(root=str(root), corpus=corpus, labelset=labelset, gt=str(world / "gt.parquet"),
                              out=str(audit_dir), mosaics=False, quiet=True))  # fmt: skip
    metrics = json.loads(summary.read_text())["metrics"]
    return {"attribute_mA": float(metrics["attribute_mA"]), "part_mIoU": float(metrics["part_mIoU"])}


def labelset_is_clip(labelset: str) -> bool:
    return not labelset.startswith("gt-")


def _pretrain(cfg: AblationConfig, variant: Variant, seed: int, root: Path, labelset: str, out: Path) -> Path:
    """Pre-train + export one variant; returns the export folder (reused when its config is unchanged)."""
    from pretrain.config import PretrainConfig
    from pretrain.trainer import export_run, train

    overrides = [*cfg.pretrain_overrides, *variant.overrides]
    overrides += [f"data.root={root}", f"data.corpus={cfg.corpus}", f"data.labelset={labelset}", f"seed={seed}"]
    overrides.append(f"quiet={str(cfg.quiet).lower()}")
    pcfg = load_config(PretrainConfig, repo_path(cfg.pretrain_config), overrides)
    key = _hash({k: v for k, v in to_dict(pcfg).items() if k != "out"})
    run_dir = out / "pretrain" / f"{variant.name}-s{seed}-{key}"
    export_dir = out / "backbones" / f"{variant.name}-s{seed}-{key}"
    if (export_dir / "config.json").is_file():
        return export_dir
    pcfg.out = str(run_dir)
    summary = train(pcfg)
    export_run(summary.checkpoint, export_dir)
    return export_dir


def _transfer(cfg: AblationConfig, run: TransferRun, backbone: str, seed: int, world: Path | None, out: Path) -> dict:
    from transfer.registry import task_entry

    data = Path(run.data)
    if not data.is_absolute() and world is not None:
        data = world / data
    config_cls, run_task = task_entry(run.task)
    extra = [f"data_dir={data}", f"dataset={run.dataset}", f"backbone.spec={backbone}", f"seed={seed}"]
    tcfg = load_config(config_cls, None, [*run.overrides, *extra, f"quiet={str(cfg.quiet).lower()}"])
    key = _hash({k: v for k, v in to_dict(tcfg).items() if k != "out_dir"})
    name = re.sub(r"[^\w.-]+", "-", Path(backbone).name)  # random:vit_micro -> random-vit_micro: no ':' in paths
    tcfg.out_dir = str(out / "transfer" / f"{run.task}-{run.dataset}" / f"{name}-{key}")
    return run_task(tcfg)


def run_ablation(cfg: AblationConfig) -> dict[str, Any]:
    """Run (or continue) every step; write results.md / results.json / results.png under ``cfg.out``."""
    if not cfg.variants or not cfg.transfers or not cfg.seeds:
        raise ClaspError("ablation: `variants`, `transfers` and `seeds` must each list at least one entry")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    log = _Log()
    root, world = _prepare_corpus(cfg, out, log)
    labelset = _label(cfg, out, root, world, log)
    report = _audit(cfg, out, root, world, labelset, log) if cfg.audit else None

    variant_labels, gt_labelset = _variant_labelsets(cfg, root, world, labelset, log)
    label_quality: dict[str, dict[str, float]] = {}
    if world is not None and cfg.audit:
        for name, set_id in variant_labels.items():
            if not _uses_labels(cfg, next(v for v in cfg.variants if v.name == name)):
                continue  # e.g. dino_only: no point on the label-quality axis
            label_quality[name] = _label_quality(out, root, cfg.corpus, set_id, world)
            log(f"audit: labels of {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in label_quality[name].items()))

    rows: list[dict[str, Any]] = []
    for variant in cfg.variants:
        for seed in cfg.seeds if variant.seeds is None else variant.seeds:
            if variant.backbone:
                backbone = variant.backbone
            elif variant.pretrain:
                backbone = str(_pretrain(cfg, variant, seed, root, variant_labels[variant.name], out))
                log(f"pretrain: {variant.name} seed {seed} -> {backbone}")
            else:
                arch = load_config(_pretrain_cls(), repo_path(cfg.pretrain_config), cfg.pretrain_overrides).model.arch
                backbone = f"random:{arch}"
            for run in cfg.transfers:
                if backbone.startswith("pixels:") and run.task != "frozen":
                    continue  # raw pixels have no weights to fine-tune or probe: frozen read-outs only
                result = _transfer(cfg, run, backbone, seed, world, out)
                value = _metric(result, run.metric)
                rows.append(
                    {
                        "variant": variant.name,
                        "seed": seed,
                        "task": run.task,
                        "dataset": run.dataset,
                        "metric": run.metric,
                        "value": value,
                        "protocol": result.get("protocol", ""),
                    }
                )
                log(f"transfer: {run.task}/{run.dataset} {variant.name} seed {seed}: {run.metric} = {value:.4f}")

    table = _summarise(rows, cfg)
    gt_names = [v.name for v in cfg.variants if v.labels == "gt" and v.pretrain and not v.backbone]
    checks = check_instrument(table, [(column(r), r.metric) for r in cfg.transfers], gt_names, label_quality,
                              cfg.control_margins)  # fmt: skip
    for c in checks["positive_control"]:
        log(f"check: positive control on {c['column']}: {'passes' if c['passed'] else 'FAILS'} ({c['reason']})")
    for d in checks["dose_response"]:
        log(f"check: dose-response on {d['column']}: {'monotone' if d['monotone'] else 'NOT monotone'}")
    results = {
        "labelset": labelset,
        "gt_labelset": gt_labelset,
        "audit_report": str(report) if report else None,
        "label_quality": label_quality,  # per variant: its labels against the truth (clasp audit --gt)
        "rows": rows,
        "table": table,
        "checks": checks,
    }
    write_json_atomic(out / "results.json", results)
    md = markdown_table(table, cfg, labelset, label_quality) + checks_markdown(checks)
    (out / "results.md").write_text(md)
    plot_results(table, cfg, out / "results.png", label_quality)
    print(md)
    if report:
        print(f"audit report: {report}")
    return results


def _variant_labelsets(
    cfg: AblationConfig, root: Path, world: Path | None, labelset: str, log: _Log
) -> tuple[dict[str, str], str | None]:
    """(variant name -> the label set it pre-trains on, the undegraded ground-truth label set if any); writes
    the ground-truth label sets that ``labels: gt`` variants ask for."""
    gt_labelset = None
    variant_labels: dict[str, str] = {}
    for variant in cfg.variants:
        if not variant.pretrain or variant.backbone:
            continue
        if variant.labels == "clip":
            variant_labels[variant.name] = labelset
            continue
        if world is None:
            raise ClaspError("ablation: variants with `labels: gt` need the synthetic world (leave `root` unset)")
        from labeling.oracle import write_gt_labelset

        set_id = write_gt_labelset(root, cfg.corpus, labelset, world / "gt.parquet", attr_flip=variant.attr_flip,
                                   part_noise=variant.part_noise)  # fmt: skip
        variant_labels[variant.name] = set_id
        if variant.attr_flip == 0 and variant.part_noise == 0:
            gt_labelset = set_id
        log(f"label: ground-truth label set {set_id} for {variant.name} (not CLIP labels)")
    return variant_labels, gt_labelset


def _pretrain_cls() -> type:
    from pretrain.config import PretrainConfig

    return PretrainConfig


def _uses_labels(cfg: AblationConfig, variant: Variant) -> bool:
    """Whether the variant's pre-training reads its label set (part, attribute or distillation loss on)."""
    loss = load_config(_pretrain_cls(), repo_path(cfg.pretrain_config), [*cfg.pretrain_overrides, *variant.overrides])
    return bool(loss.model.loss.part or loss.model.loss.attribute or loss.model.loss.distill)


def _metric(result: dict[str, Any], name: str) -> float:
    """The headline metric of a transfer result (looked up at the top level, then in `metrics`)."""
    for scope in (result, result.get("metrics", {})):
        if isinstance(scope, dict) and name in scope:
            return float(scope[name])
    raise ClaspError(f"transfer results have no metric '{name}' (keys: {', '.join(result)})")


def _summarise(rows: list[dict[str, Any]], cfg: AblationConfig) -> list[dict[str, Any]]:
    import numpy as np

    table = []
    for variant in cfg.variants:
        entry: dict[str, Any] = {"variant": variant.name}
        for run in cfg.transfers:
            vals = [
                r["value"]
                for r in rows
                if r["variant"] == variant.name and r["task"] == run.task and r["dataset"] == run.dataset
            ]
            if vals:  # a raw-pixel variant has no trained read-out
                entry[column(run)] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
        table.append(entry)
    return table
