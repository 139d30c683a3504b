"""The ablation's verdicts on its own instrument: positive control and dose-response monotonicity."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ablate_checks import check_instrument, checks_markdown, dose_response, positive_control

COL = "pa100k mA frozen"


def row(variant: str, *values: float) -> dict:
    return {"variant": variant, COL: {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}}


def test_control_passes_with_margin_seeds_and_floor() -> None:
    table = [row("raw_pixels", 0.64), row("random_init", 0.58, 0.59, 0.60), row("gt_labels", 0.66, 0.67, 0.68)]
    verdict = positive_control(table, COL, margin=0.05)
    assert verdict["passed"], verdict["reason"]
    assert verdict["gain"] == pytest.approx(0.08)
    assert verdict["reason"] == "+8.00 points over random_init, seed std 0.82, +3.00 over raw_pixels"


@pytest.mark.parametrize(
    ("gt", "pixels", "reason"),
    [
        ((0.62, 0.63, 0.64), 0.60, "< 5.0 points"),  # gain 4 points
        ((0.60, 0.66, 0.76), 0.60, "twice the seed std"),  # gain 8 points, spread larger
        ((0.66, 0.67, 0.68), 0.70, "not above raw_pixels"),  # below the floor
        ((0.67,), 0.60, "1 seed(s)"),  # one seed
    ],
)
def test_control_fails_and_says_why(gt: tuple[float, ...], pixels: float, reason: str) -> None:
    table = [row("raw_pixels", pixels), row("random_init", 0.58, 0.59, 0.60), row("gt_labels", *gt)]
    verdict = positive_control(table, COL, margin=0.05)
    assert not verdict["passed"]
    assert reason in verdict["reason"]


def test_dose_response_orders_by_measured_label_quality() -> None:
    quality = {"gt_labels": {"attribute_mA": 1.0}, "n1": {"attribute_mA": 0.9}, "n4": {"attribute_mA": 0.6}}
    rising = [row("gt_labels", 0.66, 0.67, 0.68), row("n1", 0.66), row("n4", 0.61)]
    assert dose_response(rising, COL, ["n4", "gt_labels", "n1"], quality)["monotone"] is True
    within_noise = [row("gt_labels", 0.66, 0.67, 0.68), row("n1", 0.675), row("n4", 0.61)]  # 0.5 > 0.67: noise
    assert dose_response(within_noise, COL, ["gt_labels", "n1", "n4"], quality)["monotone"] is True
    falling = [row("gt_labels", 0.60, 0.61, 0.62), row("n1", 0.66), row("n4", 0.68)]
    verdict = dose_response(falling, COL, ["gt_labels", "n1", "n4"], quality)
    assert verdict["monotone"] is False and "gt_labels" in verdict["reason"]


def test_checks_need_their_rows() -> None:
    table = [row("random_init", 0.58, 0.59, 0.60), row("clasp", 0.6)]
    checks = check_instrument(table, [(COL, "mA")], [], {}, {"mA": 0.05})
    assert checks == {"positive_control": [], "dose_response": []}
    assert checks_markdown(checks) == ""
    failing = check_instrument([*table, row("gt_labels", 0.6)], [(COL, "mA")], [], {}, {"mA": 0.05})
    assert "FAILS" in checks_markdown(failing)
