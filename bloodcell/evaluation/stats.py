"""How sure a figure is: intervals for one classifier's results, paired tests between two.

Everything here works on class ids (true labels, predicted labels), so it serves a training run's
evaluation, ``bloodcell.compare``, the champion gate of ``bloodcell.promote`` and the sweep report alike.

* accuracy and per-class recall are proportions of independent images: Wilson score intervals (scipy's
  ``binomtest(...).proportion_ci``), which stay sensible at 0/n and n/n, where a bootstrap collapses to a
  point (a rare class recognised 30 times out of 30 is not "certainly 100%");
* macro-F1 is no proportion: a percentile bootstrap over images (``scipy.stats.bootstrap``);
* two models on the same images: McNemar's exact test on the images only one of them gets right
  (statsmodels), differences with a paired bootstrap over the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bloodcell import NUM_CLASSES

#: confidence of every interval bloodcell reports
CONFIDENCE = 0.95
#: bootstrap resamples: the 2.5% and 97.5% percentiles of 2,000 resamples move by about 0.1 point between
#: seeds on 2,000 test images, below the interval's own width (several points)
RESAMPLES = 2000
#: bootstrap seed: the same predictions give the same interval in every run and report
SEED = 0


def interval_names(metric: str) -> tuple[str, str]:
    """The names under which the interval of ``metric`` is logged (the one place that names them)."""
    return f"{metric}_ci_low", f"{metric}_ci_high"


def with_interval(metric: str, value: float, interval: tuple[float, float]) -> dict[str, float]:
    """``{metric: value, <metric>_ci_low: ..., <metric>_ci_high: ...}``."""
    low, high = interval_names(metric)
    return {metric: float(value), low: float(interval[0]), high: float(interval[1])}


def wilson(correct: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of ``correct / total``; (nan, nan) when there is nothing to count."""
    from scipy.stats import binomtest

    if total <= 0:
        return (float("nan"), float("nan"))
    ci = binomtest(int(correct), int(total)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _confusions(codes: np.ndarray) -> np.ndarray:
    """(..., K, K) confusion counts from codes ``true * K + predicted`` laid out along the last axis."""
    lead = codes.shape[:-1]
    flat = codes.reshape(-1, codes.shape[-1])
    offsets = (np.arange(len(flat)) * NUM_CLASSES * NUM_CLASSES)[:, None]
    counts = np.bincount((flat + offsets).ravel(), minlength=len(flat) * NUM_CLASSES * NUM_CLASSES)
    return counts.reshape(*lead, NUM_CLASSES, NUM_CLASSES)


def _macro_f1(confusion: np.ndarray) -> np.ndarray:
    """Macro-F1 over all K classes of (..., K, K) confusions; a class with no images and no predictions
    scores 0, as scikit-learn's ``f1_score(labels=range(K), zero_division=0)`` does."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1).astype(float)
    denominator = confusion.sum(axis=-1) + confusion.sum(axis=-2)  # 2tp + fn + fp
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return f1.mean(axis=-1)


def _codes(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    return np.asarray(labels, dtype=np.int64) * NUM_CLASSES + np.asarray(predicted, dtype=np.int64)


def _percentile_bootstrap(
    data: tuple[np.ndarray, ...], statistic: Callable[..., np.ndarray], confidence: float
) -> tuple[float, float]:
    """A percentile bootstrap over images (paired when several arrays are given). Percentile rather than
    scipy's default BCa: BCa fails outright when every resample gives the same value (a perfect model)."""
    from scipy.stats import bootstrap

    if len(data[0]) < 2:
        return (float("nan"), float("nan"))
    result = bootstrap(
        data,
        statistic,
        paired=len(data) > 1,
        vectorized=True,
        n_resamples=RESAMPLES,
        batch=250,  # bounds memory: 250 resamples of the images at a time
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(SEED),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def macro_f1_interval(
    labels: np.ndarray, predicted: np.ndarray, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Percentile bootstrap interval of macro-F1, resampling images."""

    def statistic(codes: np.ndarray, axis: int = -1) -> np.ndarray:
        return _macro_f1(_confusions(np.moveaxis(codes, axis, -1)))

    return _percentile_bootstrap((_codes(labels, predicted),), statistic, confidence)


def recall_intervals(
    labels: np.ndarray, predicted: np.ndarray, confidence: float = CONFIDENCE
) -> list[tuple[float, float]]:
    """Wilson interval of each class's recall (its images recognised / its images), class by class."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    return [
        wilson(int(np.sum((labels == c) & (predicted == c))), int(np.sum(labels == c)), confidence)
        for c in range(NUM_CLASSES)
    ]


# ---- two models, the same images ---------------------------------------------------------------------


@dataclass
class PairedTest:
    """McNemar's exact test of model B against model A on the same images."""

    #: [[both right, only A right], [only B right, both wrong]]
    table: np.ndarray
    p_value: float

    @property
    def only_a(self) -> int:
        return int(self.table[0, 1])

    @property
    def only_b(self) -> int:
        return int(self.table[1, 0])


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> PairedTest:
    """Exact (binomial) McNemar test, two-sided: do A and B err on different images more often one way
    than the other? Only the images exactly one of them gets right count."""
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    table = np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]], dtype=np.int64)
    p = 1.0 if table[0, 1] + table[1, 0] == 0 else float(sm_mcnemar(table, exact=True).pvalue)
    return PairedTest(table, p)


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (statsmodels): several comparisons against one reference at once."""
    from statsmodels.stats.multitest import multipletests

    if not p_values:
        return []
    return [float(p) for p in multipletests(p_values, method="holm")[1]]


def accuracy_delta_interval(
    labels: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Paired bootstrap interval of accuracy(B) - accuracy(A) over the same images."""
    labels = np.asarray(labels)
    diff = (np.asarray(predicted_b) == labels).astype(float) - (np.asarray(predicted_a) == labels)

    def statistic(d: np.ndarray, axis: int = -1) -> np.ndarray:
        return d.mean(axis=axis)

    return _percentile_bootstrap((diff,), statistic, confidence)


def macro_f1_delta_interval(
    labels: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Paired bootstrap interval of macro-F1(B) - macro-F1(A), resampling images for both at once."""

    def statistic(codes_a: np.ndarray, codes_b: np.ndarray, axis: int = -1) -> np.ndarray:
        a, b = np.moveaxis(codes_a, axis, -1), np.moveaxis(codes_b, axis, -1)
        return _macro_f1(_confusions(b)) - _macro_f1(_confusions(a))

    return _percentile_bootstrap(
        (_codes(labels, predicted_a), _codes(labels, predicted_b)), statistic, confidence
    )


@dataclass
class ClassDelta:
    """Recall of one class under A and B on the same images, and B - A with its paired interval."""

    images: int
    recall_a: float
    recall_b: float
    delta: float
    interval: tuple[float, float]


def recall_deltas(
    labels: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray, confidence: float = CONFIDENCE
) -> list[ClassDelta]:
    """Per class: recall under A and B and a paired bootstrap interval of the difference, resampling that
    class's own images (so a rare class is never absent from a resample)."""
    labels, predicted_a, predicted_b = map(np.asarray, (labels, predicted_a, predicted_b))
    out = []
    for c in range(NUM_CLASSES):
        mine = labels == c
        n = int(mine.sum())
        if n == 0:
            nan = float("nan")
            out.append(ClassDelta(0, nan, nan, nan, (nan, nan)))
            continue
        right_a, right_b = predicted_a[mine] == c, predicted_b[mine] == c
        diff = right_b.astype(float) - right_a
        interval = _percentile_bootstrap((diff,), lambda d, axis=-1: d.mean(axis=axis), confidence)
        if n == 1:
            interval = (float(diff[0]), float(diff[0]))
        out.append(ClassDelta(n, float(right_a.mean()), float(right_b.mean()), float(diff.mean()), interval))
    return out
