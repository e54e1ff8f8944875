"""Abstention: send the doubtful cells to a human. Keeping only the images whose top probability reaches a
threshold trades coverage (the share kept) for accuracy on what is kept; the accuracy/coverage curve shows
the whole trade, and `coverage_at_accuracy` reads off where a wanted accuracy is reached.

Used by training (every run logs the curve on its test split, with calibrated probabilities) and by
``python -m bloodcell.predict ... review_below=0.9`` (`review_mask`, `review_summary`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: the accuracies whose coverage every run logs (abstention/coverage_at_<95|99>_accuracy)
TARGET_ACCURACIES = (0.95, 0.99)


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


def abstention_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``abstention/coverage_at_<95|99>_accuracy`` and ``abstention/threshold_at_<95|99>_accuracy``."""
    curve = accuracy_coverage(probabilities, labels)
    metrics = {}
    for target in TARGET_ACCURACIES:
        coverage, threshold = coverage_at_accuracy(curve, target)
        percent = round(100 * target)
        metrics[f"abstention/coverage_at_{percent}_accuracy"] = coverage
        metrics[f"abstention/threshold_at_{percent}_accuracy"] = threshold
    return metrics


def accuracy_coverage_figure(probabilities: np.ndarray, labels: np.ndarray, split: str = "test") -> Figure:
    """Accuracy on the images kept against the share kept, with the 95% and 99% accuracy levels and the
    coverage each allows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = accuracy_coverage(probabilities, labels)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(curve.coverage, curve.accuracy, ".-", label="kept: top probability >= a threshold")
    for target, color in zip(TARGET_ACCURACIES, ("tab:orange", "tab:green")):
        coverage, threshold = coverage_at_accuracy(curve, target)
        label = f"{target:.0%} accuracy: {coverage:.1%} kept"
        if coverage > 0:
            label += f" (top probability >= {threshold:.3f})"
            ax.plot([coverage], [target], "o", color=color)
        ax.axhline(target, color=color, linestyle=":", label=label)
    ax.set_xlabel("share of images kept (coverage)")
    ax.set_ylabel("accuracy on the images kept")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(min(0.9, float(curve.accuracy.min()) - 0.02), 1.005)
    ax.set_title(f"Accuracy vs coverage on the {split} split")
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    return fig


def review_mask(probabilities: np.ndarray, below: float) -> np.ndarray:
    """True for each image whose top probability is below ``below``: for a human to review."""
    return np.asarray(probabilities).max(axis=1) < below


def review_summary(review: np.ndarray, below: float) -> str:
    """E.g. "412 of 5000 images (8.2%) below 0.9: marked review"."""
    count, total = int(np.sum(review)), len(review)
    return f"{count} of {total} images ({count / max(total, 1):.1%}) below {below:g}: marked review"
