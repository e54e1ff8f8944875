"""Calibrated probabilities: temperature scaling fitted on the validation split, the expected calibration
error before and after, a reliability diagram, and the model with its temperature built in.

    temperature = fit_temperature(val_probabilities, val_labels)
    calibrated = with_temperature(model, temperature)   # logs, predicts and submits like any model
    expected_calibration_error(apply_temperature(test_probabilities, temperature), test_labels)

Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks") divides the logits by one
number T fitted to minimise the validation negative log-likelihood: T > 1 softens an over-confident model,
T < 1 sharpens an under-confident one. It works on probabilities (log p is the logits up to a constant), so
it applies as well to an ensemble's averaged probabilities, and it never changes the predicted class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

# Importing this module registers the layer calibrated models end with: Keras' loader finds a layer of a
# saved model only when its class is registered, so code outside bloodcell's commands that loads a logged
# model with Keras or MLflow imports bloodcell.evaluation.calibration first. The class lives in the submission
# template, which ships as the submission's model.py and must load calibrated models without bloodcell.
from bloodcell.serving.submission_template import TemperatureScaling

if TYPE_CHECKING:
    import keras
    from matplotlib.figure import Figure

__all__ = [
    "TemperatureScaling",
    "apply_temperature",
    "calibration_metrics",
    "expected_calibration_error",
    "fit_temperature",
    "reliability_figure",
    "with_temperature",
]
#: the bounds of the temperature search: wide enough for any model seen (0.5-3 on real cells), and
#: bounded away from 0 so that log(p) / T stays finite
TEMPERATURE_BOUNDS = (0.05, 20.0)
#: probabilities are clipped here before the log (as the TemperatureScaling layer does: its EPSILON)
EPSILON = 1e-7


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(clip(p)) / T) row by row, in float64: what the TemperatureScaling layer computes."""
    from scipy.special import log_softmax

    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), EPSILON, 1.0))
    return np.exp(log_softmax(logits / temperature, axis=1))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T in `TEMPERATURE_BOUNDS` that minimises the negative log-likelihood of ``labels``
    under softmax(log(p) / T): a bounded one-dimensional search (scipy's minimize_scalar)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), EPSILON, 1.0))
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) == 0 or len(labels) != len(logits):
        raise ValueError(f"fit_temperature needs one label per row: {len(logits)} rows, {len(labels)} labels")
    rows = np.arange(len(labels))

    def nll(temperature: float) -> float:
        return float(-log_softmax(logits / temperature, axis=1)[rows, labels].mean())

    found = minimize_scalar(nll, bounds=TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(found.x)


def _top_label_bins(
    probabilities: np.ndarray, labels: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin on [0, 1]: image count, mean top probability, accuracy (NaN where
    empty). A top probability of exactly 1 falls in the last bin."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels).reshape(-1)
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    counts = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(which, weights=correct, minlength=bins) / counts
    return counts, mean_confidence, accuracy


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label expected calibration error: the mean, weighted by images, of |accuracy - mean top
    probability| over ``bins`` equal-width confidence bins (Guo et al. 2017; 15 bins as there).

    Written out in numpy: scikit-learn has only a per-class binary `calibration_curve`, and the libraries
    that ship an ECE (torchmetrics, TensorFlow Probability) are not in this project's stack."""
    counts, mean_confidence, accuracy = _top_label_bins(probabilities, labels, bins)
    filled = counts > 0
    gaps = np.abs(accuracy[filled] - mean_confidence[filled])
    return float(np.sum(counts[filled] * gaps) / counts.sum())


def reliability_figure(
    before: np.ndarray,
    after: np.ndarray,
    labels: np.ndarray,
    temperature: float,
    bins: int = 15,
    split: str = "test",
) -> Figure:
    """Reliability diagram: accuracy per confidence bin before and after temperature scaling, against the
    diagonal of perfect calibration, with each curve's ECE; below, how many images each bin holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centers = (np.arange(bins) + 0.5) / bins
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for name, probabilities, style in (
        ("before", before, "o-"),
        (f"after (T={temperature:.2f})", after, "s-"),
    ):
        counts, mean_confidence, accuracy = _top_label_bins(probabilities, labels, bins)
        filled = counts > 0
        ece = expected_calibration_error(probabilities, labels, bins)
        ax.plot(mean_confidence[filled], accuracy[filled], style, label=f"{name}: ECE {ece:.3f}")
        hist.bar(centers, counts, width=1 / bins, alpha=0.5, label=name)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Reliability on the {split} split (top class)")
    ax.legend(loc="upper left")
    hist.set_xlabel("top probability")
    hist.set_ylabel("images")
    fig.tight_layout()
    return fig


def with_temperature(model: keras.Model, temperature: float) -> keras.Model:
    """``model`` followed by a TemperatureScaling layer: the same inputs, calibrated probabilities out.
    The layers are shared (no copy of the weights); the result saves and loads as a .keras file, and the
    submission's model.py loads it (the layer is defined there)."""
    import keras

    scaling = TemperatureScaling(temperature, name="temperature_scaling")
    outputs = getattr(model, "outputs", None)  # functional and Sequential models: keep their layers flat
    if outputs:
        return keras.Model(model.inputs, scaling(outputs[0]), name=model.name)
    inputs = keras.Input(model.input_shape[1:], name="image")
    return keras.Model(inputs, scaling(model(inputs)), name=model.name)


def calibration_metrics(
    temperature: float,
    labels: dict[str, np.ndarray],
    before: dict[str, np.ndarray],
    after: dict[str, np.ndarray],
) -> dict[str, float]:
    """``calibration/temperature`` and ``calibration/<split>_ece_before`` / ``_after`` for each split."""
    metrics = {"calibration/temperature": float(temperature)}
    for split, split_labels in labels.items():
        metrics[f"calibration/{split}_ece_before"] = expected_calibration_error(before[split], split_labels)
        metrics[f"calibration/{split}_ece_after"] = expected_calibration_error(after[split], split_labels)
    return metrics
