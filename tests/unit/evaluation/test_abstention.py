"""Guaranteed review thresholds (Learn then Test): on synthetic calibrated predictions, whose accuracy among
kept cells is known for any threshold, the promise holds at its confidence over many calibration draws
where the point estimate read off one split breaks it about half the time; and the exact edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bloodcell.evaluation.abstention import (
    accuracy_coverage,
    batch_error_bound,
    check_threshold,
    coverage_at_accuracy,
    guarantee_metrics,
    guaranteed_threshold,
    metric_suffix,
)


def calibrated_cells(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n cells of a perfectly calibrated 8-class model: top probability c (most near 1, a tail down to
    1/8), right with probability c, the rest of the mass spread over the other classes."""
    confidence = 1 - rng.beta(0.3, 8, n) * 0.875
    labels = rng.integers(0, 8, n)
    right = rng.random(n) < confidence
    predicted = np.where(right, labels, (labels + 1 + rng.integers(0, 7, n)) % 8)
    probabilities = np.repeat(((1 - confidence) / 7)[:, None], 8, axis=1)
    probabilities[np.arange(n), predicted] = confidence
    return probabilities, labels


def accuracy_above(population: tuple[np.ndarray, np.ndarray]):
    """accuracy_above(t): the population's accuracy among its cells whose top probability is >= t."""
    top = population[0].max(axis=1)
    order = np.argsort(-top)
    right = np.cumsum(population[0].argmax(axis=1)[order] == population[1][order])
    descending = -top[order]

    def accuracy(threshold: float) -> float:
        kept = int(np.searchsorted(descending, -threshold, side="right"))
        return right[kept - 1] / kept if kept else float("nan")

    return accuracy


def test_the_promise_holds_at_its_confidence_where_the_point_estimate_breaks_it_half_the_time():
    rng = np.random.default_rng(7)
    accuracy = accuracy_above(calibrated_cells(rng, 1_000_000))  # every cell the model will ever see
    draws, target, confidence = 200, 0.99, 0.9
    made = broken = point_broken = 0
    for _ in range(draws):
        calibration = calibrated_cells(rng, 2000)
        guarantee = guaranteed_threshold(*calibration, target, confidence)
        if guarantee.found:
            made += 1
            broken += accuracy(guarantee.threshold) < target
        _, point = coverage_at_accuracy(accuracy_coverage(*calibration), target)
        point_broken += accuracy(point) < target
    assert made >= 0.95 * draws  # 2,000 cells are enough to promise 99% on this model
    assert broken / made <= 1 - confidence  # at most 10% broken
    assert point_broken / draws >= 0.3  # read off one split, it promises too much about half the time


def test_the_batch_promise_holds_on_finite_batches_where_the_long_run_one_may_miss_by_a_hair():
    """A batch of 1,000 kept cells scatters around the kept population's accuracy; the batch promise
    certifies the population below the target by the margin that scatter needs."""
    from scipy.stats import binom

    bound = batch_error_bound(0.01, 1000, 0.05)
    assert 0.004 < bound < 0.01
    sizes = np.arange(1000, 4001)
    assert binom.sf(np.floor(0.01 * sizes), sizes, bound).max() <= 0.05  # any batch of 1,000 to 4,000
    rng = np.random.default_rng(3)
    draws, made, broken = 100, 0, 0
    for _ in range(draws):
        calibration, batch = calibrated_cells(rng, 3000), calibrated_cells(rng, 4000)
        promise = guaranteed_threshold(*calibration, 0.99, 0.9, batch_cells=1000)
        long_run = guaranteed_threshold(*calibration, 0.99, 0.9)
        if promise.found:
            assert promise.threshold >= long_run.threshold  # the batch promise keeps fewer cells
            check = check_threshold(*batch, promise)
            assert check.coverage * 4000 >= 1000  # the batch checked holds >= 1,000 kept cells
            made += 1
            broken += not check.held
    assert made >= 0.6 * draws  # a weaker model than the real one: 3,000 cells do not always suffice
    assert broken / made <= 0.1


def test_an_under_confident_model_is_certified_from_a_lower_start():
    # every cell right at top probability 0.7 (label smoothing, an ensemble): the starts near 99% keep no
    # cell, the one at 0.5 certifies it
    probabilities = np.tile([0.7] + [0.3 / 7] * 7, (1000, 1))
    guarantee = guaranteed_threshold(probabilities, np.zeros(1000, dtype=int), 0.99, 0.9)
    assert guarantee.found and guarantee.threshold <= 0.7 and guarantee.calibration_coverage == 1.0


def test_a_certified_threshold_keeps_every_cell_of_an_always_right_model_and_none_for_too_few():
    # 1,000 cells, all right at top probability 0.95: P(0 errors | error rate 1%) = 0.99^1000 ~ 4e-5
    probabilities = np.tile([0.95] + [0.05 / 7] * 7, (1000, 1))
    labels = np.zeros(1000, dtype=int)
    guarantee = guaranteed_threshold(probabilities, labels, 0.99, 0.9)
    assert guarantee.found and guarantee.threshold <= 0.95
    assert guarantee.calibration_coverage == 1.0 and guarantee.calibration_images == 1000
    assert guarantee.promise() == "kept cells >= 99% correct with 90% confidence (in the long run)"
    # 50 cells cannot show 99% at 90% confidence: 0.99^50 = 0.61, above the 0.1 / 3 each scan may spend
    few = guaranteed_threshold(probabilities[:50], labels[:50], 0.99, 0.9)
    assert not few.found and math.isnan(few.threshold) and few.calibration_coverage == 0.0


def test_one_wrong_cell_more_than_the_binomial_allows_stops_the_scan_above_it():
    # 400 right cells at 0.99, then 100 at 0.6 of which 10 are wrong: 99% is certified only above 0.6
    top = np.r_[np.full(400, 0.99), np.full(100, 0.6)]
    probabilities = np.stack([top, 1 - top], axis=1)
    labels = np.r_[np.zeros(490, dtype=int), np.ones(10, dtype=int)]
    guarantee = guaranteed_threshold(probabilities, labels, 0.99, 0.9)
    assert 0.6 < guarantee.threshold <= 0.99
    assert guarantee.calibration_coverage == pytest.approx(0.8)
    check = check_threshold(probabilities, labels, guarantee)
    assert (check.accuracy, check.coverage, check.held) == (1.0, 0.8, True)


def test_guarantee_metrics_name_the_target_and_check_on_the_other_split():
    rng = np.random.default_rng(0)
    metrics, guarantees = guarantee_metrics(
        calibrated_cells(rng, 3000), calibrated_cells(rng, 3000), (0.95, 0.995), batch_cells=None
    )
    assert metrics["abstention/confidence"] == 0.9 and metrics["abstention/calibration_images"] == 3000
    assert [metric_suffix(g.target) for g in guarantees] == ["95", "99.5"]
    for suffix, guarantee in zip(("95", "99.5"), guarantees):
        assert metrics[f"abstention/threshold_at_{suffix}_accuracy"] == pytest.approx(
            guarantee.threshold, nan_ok=True
        )
        assert 0 < metrics[f"abstention/test_coverage_at_{suffix}_accuracy"] <= 1
        held = metrics[f"abstention/test_kept_accuracy_at_{suffix}_accuracy"] >= guarantee.target
        assert metrics[f"abstention/test_held_at_{suffix}_accuracy"] == float(held)
    with pytest.raises(ValueError, match="must both be in"):
        guaranteed_threshold(*calibrated_cells(rng, 10), 1.0)
