"""The ablation's own verdict on its instrument: does the positive control pass, is the dose-response monotone?

A results table whose positive control fails is a bug report, not a result (DESIGN.md section 4), so the
runner checks it and says so next to the table instead of leaving it to the reader:

- **positive control**, per table column: ``gt_labels`` (pre-training on the world's truth) must beat
  ``random_init`` by at least the metric's margin (``control_margins``; default 3 mAP points on re-ID, 5 mA
  points on attributes), by more than twice the seed std (the two rows' pooled std), on at least
  ``min_seeds`` seeds each, and must beat ``raw_pixels`` (the floor) where that row exists.
- **dose-response**, per column: the ground-truth rows (``gt_labels`` and its degraded copies) ordered by
  the measured attribute mA of their labels must not fall by more than twice the seed noise from one label
  quality to the next better one (noise: the largest seed std among those rows, which is 0 when each has
  one seed - then any fall counts).

Both verdicts go to ``results.json`` (``checks``) and ``results.md``; nothing is hidden when they fail.
"""

from __future__ import annotations

import math
from typing import Any

CONTROL, FLOOR_RANDOM, FLOOR_PIXELS = "gt_labels", "random_init", "raw_pixels"
DEFAULT_MARGINS = {"mAP": 0.03, "mA": 0.05}


def table_cell(table: list[dict[str, Any]], variant: str, col: str) -> dict[str, float] | None:
    """The ``{mean, std, n}`` cell of ``variant`` in column ``col``, None when the row or cell is missing."""
    return next((e[col] for e in table if e["variant"] == variant and col in e), None)


def positive_control(table: list[dict[str, Any]], col: str, margin: float, min_seeds: int = 3) -> dict[str, Any] | None:
    """Verdict of the positive control on one table column (values are fractions, as in the table); None when
    the table has no gt_labels or random_init cell there (nothing to judge)."""
    gt, rnd = table_cell(table, CONTROL, col), table_cell(table, FLOOR_RANDOM, col)
    if gt is None or rnd is None:
        return None
    px = table_cell(table, FLOOR_PIXELS, col)
    gain = gt["mean"] - rnd["mean"]
    noise = math.sqrt((gt["std"] ** 2 + rnd["std"] ** 2) / 2)
    over_pixels = None if px is None else gt["mean"] - px["mean"]
    failures = []
    if min(gt["n"], rnd["n"]) < min_seeds:
        failures.append(f"{min(gt['n'], rnd['n'])} seed(s), {min_seeds} needed")
    if gain < margin:
        failures.append(f"gain over {FLOOR_RANDOM} {100 * gain:+.2f} < {100 * margin:.1f} points")
    if gain <= 2 * noise:
        failures.append(f"gain {100 * gain:+.2f} not above twice the seed std ({200 * noise:.2f})")
    if over_pixels is not None and over_pixels <= 0:
        failures.append(f"{CONTROL} {100 * gt['mean']:.2f} not above {FLOOR_PIXELS} {100 * px['mean']:.2f}")
    return {
        "column": col,
        "passed": not failures,
        "gain": gain,
        "seed_std": noise,
        "over_pixels": over_pixels,
        "reason": "; ".join(failures) or _passing(gain, noise, over_pixels),
    }


def _passing(gain: float, noise: float, over_pixels: float | None) -> str:
    text = f"{100 * gain:+.2f} points over {FLOOR_RANDOM}, seed std {100 * noise:.2f}"
    return text + ("" if over_pixels is None else f", {100 * over_pixels:+.2f} over {FLOOR_PIXELS}")


def dose_response(
    table: list[dict[str, Any]], col: str, gt_variants: list[str], label_quality: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Is downstream quality non-decreasing in measured label quality, within twice the seed noise?"""
    points = [
        (label_quality[name]["attribute_mA"], name, cell)
        for name in gt_variants
        if name in label_quality and (cell := table_cell(table, name, col)) is not None
    ]
    if len(points) < 3:
        return {"column": col, "monotone": None, "reason": f"{len(points)} ground-truth label levels, 3 needed"}
    points.sort(key=lambda p: p[0])
    noise = max(cell["std"] for _, _, cell in points)
    falls = [
        f"{b} ({100 * cb['mean']:.2f}) below {a} ({100 * ca['mean']:.2f})"
        for (_, a, ca), (_, b, cb) in zip(points, points[1:], strict=False)
        if cb["mean"] < ca["mean"] - 2 * noise
    ]
    return {
        "column": col,
        "monotone": not falls,
        "levels": [{"variant": n, "label_mA": q, "value": c["mean"]} for q, n, c in points],
        "noise": noise,
        "reason": "; ".join(falls) or "non-decreasing within twice the seed std",
    }


def check_instrument(
    table: list[dict[str, Any]],
    columns: list[tuple[str, str]],
    gt_variants: list[str],
    label_quality: dict[str, dict[str, float]],
    margins: dict[str, float],
) -> dict[str, list[dict[str, Any]]]:
    """Both verdicts for every ``(column, metric)`` of the table; empty lists when the rows are not there."""
    verdicts = (positive_control(table, col, margins.get(metric, 0.0)) for col, metric in columns)
    control = [v for v in verdicts if v is not None]
    dose = [dose_response(table, col, gt_variants, label_quality) for col, _ in columns if label_quality]
    return {"positive_control": control, "dose_response": [d for d in dose if d["monotone"] is not None]}


def checks_markdown(checks: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for c in checks["positive_control"]:
        verdict = "PASSES" if c["passed"] else "FAILS - read the table as a bug report, not a result"
        lines.append(f"- Positive control on {c['column']}: {verdict} ({c['reason']}).")
    for d in checks["dose_response"]:
        verdict = "monotone" if d["monotone"] else "NOT monotone"
        lines.append(f"- Dose-response on {d['column']}: {verdict} ({d['reason']}).")
    return ("\n**Instrument checks**\n\n" + "\n".join(lines) + "\n") if lines else ""
