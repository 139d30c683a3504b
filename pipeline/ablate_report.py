"""The ablation's outputs for people: results.md (table + protocol) and results.png (table + dose-response)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.ablate_checks import table_cell

if TYPE_CHECKING:  # the runner imports this module
    from pipeline.ablate import AblationConfig, TransferRun


def column(run: TransferRun) -> str:
    """Table column of a transfer run: ``market1501 mAP`` (trained read-out) or ``market1501 mAP frozen``."""
    return f"{run.dataset} {run.metric}" + (" frozen" if run.task == "frozen" else "")


def markdown_table(
    table: list[dict[str, Any]], cfg: AblationConfig, labelset: str, label_quality: dict[str, dict[str, float]]
) -> str:
    cols = [column(run) for run in cfg.transfers]
    quality = ["labels attribute mA", "labels part mIoU"] if label_quality else []
    lines = ["| variant | " + " | ".join(cols + quality) + " |", "|---|" + "---|" * len(cols + quality)]
    for entry in table:
        cells = []
        for col in cols:
            cell = entry.get(col)
            text = "–" if cell is None else f"{100 * cell['mean']:.1f}"
            if cell is not None and cell["n"] > 1:
                text += f" ± {100 * cell['std']:.1f}"
            cells.append(text)
        if quality:
            q = label_quality.get(entry["variant"])
            cells += [f"{100 * q['attribute_mA']:.1f}", f"{100 * q['part_mIoU']:.1f}"] if q else ["–", "–"]
        gt = any(v.name == entry["variant"] and v.labels == "gt" for v in cfg.variants)
        lines.append(f"| {entry['variant']}{' †' if gt else ''} | " + " | ".join(cells) + " |")
    protocol = (
        f"Values in %, mean over seeds {cfg.seeds} unless a variant names its own (± = std over its seeds). "
        "re-ID: Market-1501 protocol (same-id same-camera "
        "gallery entries removed), no re-ranking. Attributes: label-based mA (Rethinking_of_PAR definition). "
        "`frozen` columns: no training at all (retrieval on pooled features; closed-form class-balanced ridge for "
        f"attributes, transfer/frozen.py); the others: linear probe as configured. Label set {labelset}."
    )
    if any(v.labels == "gt" for v in cfg.variants):
        protocol += (
            " † pre-trained on the synthetic world's ground-truth labels (upper bound) or a degraded copy of them, "
            "not CLIP labels."
        )
    if quality:
        protocol += " Label columns: the variant's pre-training labels against the truth (clasp audit --gt)."
    return "\n".join(lines) + "\n\n" + protocol + "\n"


def plot_results(
    table: list[dict[str, Any]],
    cfg: AblationConfig,
    path: Path,
    label_quality: dict[str, dict[str, float]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [column(run) for run in cfg.transfers]
    dose = [e for e in table if e["variant"] in label_quality]
    rows = 2 if len(dose) >= 2 else 1
    fig, axes = plt.subplots(rows, len(cols), figsize=(4 * len(cols), 3.2 * rows), squeeze=False)
    for ax, col in zip(axes[0], cols, strict=True):
        have = [e for e in table if col in e]
        names = [e["variant"] for e in have]
        means = [100 * e[col]["mean"] for e in have]
        stds = [100 * e[col]["std"] for e in have]
        # points with error bars on an axis fitted to the values: differences of a point near chance stay visible
        ax.errorbar(range(len(names)), means, yerr=stds, fmt="o", color="#4c72b0", capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(col + (f" (mean ± std over seeds {cfg.seeds})" if len(cfg.seeds) > 1 else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.2)
    if rows == 2:  # dose-response: downstream quality against the measured quality of the pre-training labels
        clip_names = {v.name for v in cfg.variants if v.labels == "clip"}
        for ax, col in zip(axes[1], cols, strict=True):
            for e in (e for e in dose if col in e):
                x = 100 * label_quality[e["variant"]]["attribute_mA"]
                clip = e["variant"] in clip_names
                ax.errorbar(x, 100 * e[col]["mean"], yerr=100 * e[col]["std"], fmt="s" if clip else "o", capsize=3,
                            color="#c44e52" if clip else "#55a868")  # fmt: skip
                ax.annotate(e["variant"], (x, 100 * e[col]["mean"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
            for floor, style in (("random_init", ":"), ("raw_pixels", "--")):  # the floors, for reading the points
                cell = table_cell(table, floor, col)
                if cell is not None:
                    ax.axhline(100 * cell["mean"], color="grey", linestyle=style, linewidth=1, label=floor)
            ax.legend(fontsize=6, loc="lower right")
            ax.set_xlabel("label attribute mA (audit vs truth), %", fontsize=8)
            ax.set_ylabel(col, fontsize=8)
            ax.grid(alpha=0.3)
            ax.margins(0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
