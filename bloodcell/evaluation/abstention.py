"""Abstention: send the doubtful cells to a human. Keeping only the images whose top probability reaches a
threshold trades coverage (the share kept) for accuracy on what is kept; the accuracy/coverage curve shows
the whole trade, and `coverage_at_accuracy` reads off where a wanted accuracy is reached on one split.

A threshold read off one split is a point estimate: on new cells it keeps its accuracy only about half the
time. `guaranteed_threshold` instead picks, on a calibration split (a run's validation split), the lowest
threshold for which "accuracy among kept cells >= target" holds with a stated confidence, by Learn then
Test (Angelopoulos, Bates, Candes, Jordan and Lei, 2021): for each threshold of a fixed grid, an exact
binomial test of "error among kept cells > 1 - target" on the kept calibration cells, the grid tested by
fixed-sequence testing from the confident end (no multiple-testing penalty, as the error grows with the
share kept). A single scan would stop where the grid keeps no cell yet, so it starts afresh at five points
sharing the error budget, a certified threshold handing its level on to the next (the fallback procedure,
Wiens 2003). The test split then only checks the promise (docs/statistics.md).

Used by training and ensembles (every run logs `abstention_metrics` and `guarantee_metrics`, with calibrated
probabilities) and by ``python -m bloodcell.predict ... review_accuracy=0.99`` or ``review_below=0.9``
(`review_mask`, `review_summary`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: the accuracies whose coverage every run logs (abstention/coverage_at_<95|99>_accuracy)
TARGET_ACCURACIES = (0.95, 0.99)
#: the probability that a guaranteed threshold keeps its target (trainer.abstention.confidence)
DEFAULT_CONFIDENCE = 0.9
#: the smallest batch of kept cells the promise covers (trainer.abstention.batch_cells)
DEFAULT_BATCH_CELLS = 1000
#: candidate thresholds, most confident first: 1.0, then 1 - t for t log-spaced from 1e-7 to 7/8 (a top
#: probability of 8 classes is >= 1/8). Fixed in advance, as Learn then Test requires; log-spaced because
#: a good model's top probabilities crowd just below 1.
THRESHOLD_GRID = np.concatenate([[1.0], 1.0 - np.geomspace(1e-7, 7 / 8, 600)])
#: where the scan starts afresh, each with an equal share of the error budget: just above the target (top
#: probabilities of 1 - 0.1, 0.5 and 1 times the target's error: 0.999, 0.995, 0.99 for 99%), where a
#: calibrated model's kept cells can reach it; and lower, at 0.8 and 0.5, for a model that is right more
#: often than its probabilities say (label smoothing, ensembles). One start alone would stop where the grid
#: keeps no cell yet.
_START_ERROR_SHARES = (0.1, 0.5, 1.0)
_START_PROBABILITIES = (0.8, 0.5)


def metric_suffix(target: float) -> str:
    """0.99 -> "99", 0.995 -> "99.5": the target's part of a metric name."""
    return f"{100 * target:g}"


@dataclass
class AccuracyCoverage:
    """One point per threshold that keeps a different set of images, most confident first: keeping every
    image whose top probability is >= ``thresholds[i]`` keeps ``coverage[i]`` of them, with ``accuracy[i]``
    on those kept."""

    thresholds: np.ndarray
    coverage: np.ndarray
    accuracy: np.ndarray


def accuracy_coverage(probabilities: np.ndarray, labels: np.ndarray) -> AccuracyCoverage:
    """The accuracy/coverage curve of a split. Images with equal top probability are kept or dropped
    together (a threshold cannot split them), so the curve has one point per distinct top probability."""
    probabilities = np.asarray(probabilities)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels).reshape(-1)
    order = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    kept = np.arange(1, len(confidence) + 1)
    # the last image of each run of equal top probabilities: where a threshold can cut
    cuts = np.flatnonzero(np.append(confidence[1:] != confidence[:-1], True))
    return AccuracyCoverage(
        thresholds=confidence[cuts].astype(np.float64),
        coverage=kept[cuts] / len(confidence),
        accuracy=np.cumsum(correct)[cuts] / kept[cuts],
    )


def coverage_at_accuracy(curve: AccuracyCoverage, target: float) -> tuple[float, float]:
    """The largest share of images that can be kept with accuracy >= ``target`` on them, and the threshold
    on the top probability that keeps it; (0.0, NaN) when not even the most confident images reach it."""
    reaching = np.flatnonzero(curve.accuracy >= target)
    if len(reaching) == 0:
        return 0.0, float("nan")
    best = reaching[np.argmax(curve.coverage[reaching])]
    return float(curve.coverage[best]), float(curve.thresholds[best])


def abstention_metrics(
    probabilities: np.ndarray, labels: np.ndarray, targets: tuple[float, ...] = TARGET_ACCURACIES
) -> dict[str, float]:
    """Point estimates read off one split (the test split of a run): ``abstention/coverage_at_<p>_accuracy``
    and ``abstention/point_threshold_at_<p>_accuracy`` per target. Descriptive only: a threshold read off
    the split that reports it keeps its accuracy on new cells about half the time (`guaranteed_threshold`
    is the one to use)."""
    curve = accuracy_coverage(probabilities, labels)
    metrics = {}
    for target in targets:
        coverage, threshold = coverage_at_accuracy(curve, target)
        metrics[f"abstention/coverage_at_{metric_suffix(target)}_accuracy"] = coverage
        metrics[f"abstention/point_threshold_at_{metric_suffix(target)}_accuracy"] = threshold
    return metrics


@dataclass
class Guarantee:
    """A threshold on the top probability chosen on ``calibration_images`` cells so that, with probability
    >= ``confidence``, the accuracy among the cells it keeps is >= ``target``: in every batch of at least
    ``batch_cells`` kept cells (one draw of the calibration cells and one batch of new cells from the same
    distribution), or, with ``batch_cells`` None, in the long run (the kept population). ``threshold`` is
    NaN when no threshold of the grid could be shown to reach the target (too few calibration cells, or a
    model that is not that accurate anywhere); ``calibration_coverage`` is the share of the calibration
    cells it keeps."""

    target: float
    confidence: float
    threshold: float
    calibration_images: int
    calibration_coverage: float
    batch_cells: int | None = None

    @property
    def found(self) -> bool:
        return not math.isnan(self.threshold)

    def promise(self) -> str:
        """E.g. "kept cells >= 99% correct with 90% confidence (any batch of >= 1000 kept cells)"."""
        where = f"any batch of >= {self.batch_cells} kept cells" if self.batch_cells else "in the long run"
        return (
            f"kept cells >= {100 * self.target:g}% correct with {100 * self.confidence:g}% confidence "
            f"({where})"
        )


def batch_error_bound(error: float, batch_cells: int, risk: float) -> float:
    """The largest error rate of the kept population at which a batch of ``batch_cells`` or more kept cells
    (up to 4x as many checked; the binomial tail only shrinks beyond) shows more than ``error`` with
    probability at most ``risk``: certifying the population below it makes the promise hold for batches."""
    from scipy.stats import binom

    sizes = np.arange(batch_cells, 4 * batch_cells + 1)
    allowed = np.floor(error * sizes)
    low, high = 0.0, error
    for _ in range(40):  # bisection: the tail grows with the error rate
        middle = (low + high) / 2
        if binom.sf(allowed, sizes, middle).max() <= risk:
            low = middle
        else:
            high = middle
    return low


def _error_p_values(confidence: np.ndarray, correct: np.ndarray, error: float) -> np.ndarray:
    """Per grid threshold, the exact binomial p-value of "error among kept cells > ``error``": the
    probability of at most the observed errors among the n kept, were the error rate ``error`` (1.0 when
    nothing is kept). Conditional on n the kept cells are i.i.d. draws of the kept population, so the
    p-value is valid; binomial exactness makes it conservative, never optimistic."""
    from scipy.stats import binom

    order = np.argsort(-confidence, kind="stable")
    sorted_confidence = confidence[order]
    errors_so_far = np.concatenate([[0], np.cumsum(~correct[order])])
    # kept at threshold t: every cell whose top probability is >= t (sorted descending: a prefix)
    kept = np.searchsorted(-sorted_confidence, -THRESHOLD_GRID, side="right")
    errors = errors_so_far[kept]
    p_values = binom.cdf(errors, kept, error)
    return np.where(kept > 0, p_values, 1.0)


def guaranteed_threshold(
    probabilities: np.ndarray,
    labels: np.ndarray,
    target: float,
    confidence: float = DEFAULT_CONFIDENCE,
    batch_cells: int | None = None,
) -> Guarantee:
    """The lowest threshold of `THRESHOLD_GRID` (the most cells kept) that Learn then Test certifies for
    "accuracy among kept >= ``target``" at ``confidence``, from calibration cells (never the split that
    will check it). See the module's docstring for the method.

    With ``batch_cells``, the promise is for every batch of at least that many kept cells, which is what a
    user checking a test set or a day's queue sees: half the error budget goes to the calibration cells,
    half to the batch's own binomial scatter (`batch_error_bound`), so the population is certified below
    the target's error by the margin such a batch needs. Without it, the promise is about the kept
    population, and a finite batch scatters around it (at 99% on 2,000 kept cells, by about 0.2 points)."""
    if not 0 < target < 1 or not 0 < confidence < 1:
        raise ValueError(f"target {target} and confidence {confidence} must both be in (0, 1)")
    probabilities = np.asarray(probabilities)
    top = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels).reshape(-1)
    risk, error = 1.0 - confidence, 1.0 - target
    if batch_cells:
        risk /= 2
        error = batch_error_bound(error, batch_cells, risk)
    p_values = _error_p_values(top, correct, error)
    starts = [1.0 - share * (1.0 - target) for share in _START_ERROR_SHARES]
    starts += [p for p in _START_PROBABILITIES if p < starts[-1]]
    # the first grid threshold at or below each start (the grid descends); each gets an equal share
    weight = np.zeros(len(THRESHOLD_GRID))
    for start in starts:
        weight[np.searchsorted(-THRESHOLD_GRID, -start, side="left")] += risk / len(starts)
    # fallback procedure: a threshold is tested at its own share plus, when the one before it was
    # certified, that one's level; an uncertified threshold passes nothing on
    certified: list[int] = []
    carried = 0.0
    for index, p_value in enumerate(p_values):
        level = weight[index] + carried
        carried = level if level > 0 and p_value <= level else 0.0
        if carried:
            certified.append(index)
    if not certified:
        return Guarantee(target, confidence, float("nan"), len(top), 0.0, batch_cells)
    threshold = float(THRESHOLD_GRID[max(certified)])
    return Guarantee(target, confidence, threshold, len(top), float(np.mean(top >= threshold)), batch_cells)


@dataclass
class Check:
    """What a guaranteed threshold did on cells it was not chosen on (a run's test split)."""

    accuracy: float  # among the kept cells (NaN when none is kept)
    coverage: float  # share kept
    held: bool  # accuracy >= the target


def check_threshold(probabilities: np.ndarray, labels: np.ndarray, guarantee: Guarantee) -> Check:
    """The realised accuracy and coverage of ``guarantee``'s threshold on other cells. Realised accuracy on
    a finite split scatters around the kept population's: a promise that holds can still miss by a hair on
    one split, which is why `benchmarks/abstention_guarantee.py` counts how often it holds over many."""
    probabilities = np.asarray(probabilities)
    kept = probabilities.max(axis=1) >= guarantee.threshold  # NaN keeps nothing
    correct = probabilities.argmax(axis=1) == np.asarray(labels).reshape(-1)
    accuracy = float(correct[kept].mean()) if kept.any() else float("nan")
    return Check(accuracy, float(kept.mean()), bool(kept.any() and accuracy >= guarantee.target))


def guarantee_metrics(
    calibration: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    targets: tuple[float, ...] = TARGET_ACCURACIES,
    confidence: float = DEFAULT_CONFIDENCE,
    batch_cells: int | None = DEFAULT_BATCH_CELLS,
) -> tuple[dict[str, float], list[Guarantee]]:
    """Per target, the guaranteed threshold from ``calibration`` (probabilities, labels: the validation
    split) and its check on ``test``: ``abstention/threshold_at_<p>_accuracy`` (NaN when none),
    ``abstention/calibration_coverage_at_<p>_accuracy``, ``abstention/test_kept_accuracy_at_<p>_accuracy``,
    ``abstention/test_coverage_at_<p>_accuracy``, ``abstention/test_held_at_<p>_accuracy`` (1 or 0); and
    once ``abstention/confidence``, ``abstention/batch_cells`` (0: the long run) and
    ``abstention/calibration_images``."""
    metrics = {
        "abstention/confidence": confidence,
        "abstention/batch_cells": float(batch_cells or 0),
        "abstention/calibration_images": float(len(calibration[1])),
    }
    guarantees = []
    for target in targets:
        guarantee = guaranteed_threshold(*calibration, target, confidence, batch_cells)
        check = check_threshold(*test, guarantee)
        at = f"at_{metric_suffix(target)}_accuracy"
        metrics |= {
            f"abstention/threshold_{at}": guarantee.threshold,
            f"abstention/calibration_coverage_{at}": guarantee.calibration_coverage,
            f"abstention/test_kept_accuracy_{at}": check.accuracy,
            f"abstention/test_coverage_{at}": check.coverage,
            f"abstention/test_held_{at}": float(check.held),
        }
        guarantees.append(guarantee)
    return metrics, guarantees


def accuracy_coverage_figure(
    probabilities: np.ndarray,
    labels: np.ndarray,
    split: str = "test",
    guarantees: list[Guarantee] | None = None,
) -> Figure:
    """Accuracy on the images kept against the share kept, with each target accuracy, the coverage a
    threshold read off this split allows (circles), and where the guaranteed thresholds chosen on the
    calibration split land on this one (crosses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = accuracy_coverage(probabilities, labels)
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    ax.plot(curve.coverage, curve.accuracy, ".-", label="kept: top probability >= a threshold")
    by_target = {g.target: g for g in guarantees or []}
    targets = sorted(set(TARGET_ACCURACIES) | set(by_target))
    for target, color in zip(targets, ("tab:orange", "tab:green", "tab:red", "tab:purple")):
        coverage, threshold = coverage_at_accuracy(curve, target)
        label = f"{100 * target:g}% accuracy: {coverage:.1%} kept, read off this split"
        if coverage > 0:
            label += f" (>= {threshold:.3f})"
            ax.plot([coverage], [target], "o", color=color)
        ax.axhline(target, color=color, linestyle=":", label=label)
        guarantee = by_target.get(target)
        if guarantee is not None and guarantee.found:
            check = check_threshold(probabilities, labels, guarantee)
            ax.plot(
                [check.coverage],
                [check.accuracy],
                "X",
                color=color,
                markersize=9,
                label=f"guaranteed ({100 * guarantee.confidence:g}%, {guarantee.calibration_images} "
                f"calibration cells): >= {guarantee.threshold:.3f} kept {check.coverage:.1%} "
                f"at {check.accuracy:.2%}",
            )
    ax.set_xlabel("share of images kept (coverage)")
    ax.set_ylabel("accuracy on the images kept")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(min(0.9, float(curve.accuracy.min()) - 0.02), 1.005)
    ax.set_title(f"Accuracy vs coverage on the {split} split")
    ax.legend(loc="lower left", fontsize="x-small")
    fig.tight_layout()
    return fig


def review_mask(probabilities: np.ndarray, below: float) -> np.ndarray:
    """True for each image whose top probability is below ``below``: for a human to review."""
    return np.asarray(probabilities).max(axis=1) < below


def review_summary(review: np.ndarray, below: float) -> str:
    """E.g. "412 of 5000 images (8.2%) below 0.9: marked review"."""
    count, total = int(np.sum(review)), len(review)
    return f"{count} of {total} images ({count / max(total, 1):.1%}) below {below:g}: marked review"
