"""Calibrated probabilities: temperature scaling fitted on the validation split, the expected calibration
error before and after, a reliability diagram, and the model with its temperature built in (standard Keras
layers only, so that any Keras or MLflow user loads it without bloodcell).

    temperature = fit_temperature(val_probabilities, val_labels)
    calibrated = with_temperature(model, temperature)   # logs, predicts and submits like any model
    expected_calibration_error(apply_temperature(test_probabilities, temperature), test_labels)

Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks") divides the logits by one
number T fitted to minimise the validation negative log-likelihood: T > 1 softens an over-confident model,
T < 1 sharpens an under-confident one. It works on probabilities (log p is the logits up to a constant), so
it applies as well to an ensemble's averaged probabilities, and it never changes the predicted class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

# The layer that calibrated models logged before issue 27 end with. New models hold no custom layer (the
# temperature is folded into the last Dense layer, or, in an ensemble, is a Rescaling layer); the class stays
# registered (importing this module registers it) so that those older models still load in bloodcell, and
# `with_temperature` / `log_probabilities` fold it away when such a model is calibrated again or averaged.
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
    "log_probabilities",
    "reliability_figure",
    "with_temperature",
]
#: the bounds of the temperature search: wide enough for any model seen (0.5-3 on real cells), and
#: bounded away from 0 so that log(p) / T stays finite
TEMPERATURE_BOUNDS = (0.05, 20.0)
#: probabilities are clipped here before the log: the smallest normal float32, so that log(p) is the model's
#: logits up to a constant wherever a float32 softmax can say so, and the numpy formula gives what the
#: calibrated model itself computes (softmax(logits / T)). (The older TemperatureScaling layer clips at 1e-7.)
EPSILON = float(np.finfo(np.float32).tiny)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(clip(p)) / T) row by row, in float64: what the calibrated model computes."""
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


def _producer(tensor: Any) -> Any:
    """The layer whose output ``tensor`` (a symbolic tensor of a functional model) is."""
    return tensor._keras_history.operation


def _input_of(tensor: Any) -> Any:
    """The (first) input tensor of the call that made ``tensor``: right also for a layer called more than
    once (a nested model)."""
    history = tensor._keras_history
    return history.operation._inbound_nodes[history.node_index].input_tensors[0]


def _activation(layer: Any) -> str:
    return str(getattr(getattr(layer, "activation", None), "__name__", ""))


def _functional(model: keras.Model) -> keras.Model:
    """``model`` as a functional model with one output (a Sequential one is rebuilt, sharing its layers)."""
    import keras

    if getattr(model, "outputs", None) and len(model.outputs) == 1:
        return model
    inputs = keras.Input(model.input_shape[1:], name="image")
    return keras.Model(inputs, model(inputs), name=model.name)


def _scaled_dense(dense: Any, temperature: float, activation: str) -> Any:
    """A copy of the Dense layer ``dense`` (same name and config) whose kernel and bias are divided by
    ``temperature``, with ``activation``: its pre-activation outputs are the logits / T."""
    import keras

    config = {**dense.get_config(), "activation": activation}
    scaled = keras.layers.Dense.from_config(config)
    scaled.build((None, int(dense.kernel.shape[0])))
    scaled.set_weights([np.asarray(w) / np.float32(temperature) for w in dense.get_weights()])
    return scaled


def _softmax_output(model: keras.Model, temperature: float, activation: str, what: str) -> Any:
    """The output of ``model`` (functional) rebuilt as ``activation`` ("softmax" or "log_softmax") of its
    logits divided by ``temperature``, from standard layers only: a last Dense with a softmax gets a scaled
    copy; an older model's TemperatureScaling is folded into the Dense before it; a last Activation
    ("softmax", e.g. an ensemble's) gets a Rescaling before it."""
    import keras

    output = model.outputs[0]
    last = _producer(output)
    if isinstance(last, keras.Model):  # a nested model at the end (a Sequential wrapping one)
        inner = _functional(last)
        nested = keras.Model(
            inner.inputs, _softmax_output(inner, temperature, activation, what), name=last.name
        )
        return nested(_input_of(output))
    if isinstance(last, TemperatureScaling):
        probabilities = _input_of(output)
        dense = _producer(probabilities)
        if isinstance(dense, keras.layers.Dense) and _activation(dense) == "softmax":
            return _scaled_dense(dense, temperature * last.temperature, activation)(_input_of(probabilities))
    elif isinstance(last, keras.layers.Dense) and _activation(last) == "softmax":
        return _scaled_dense(last, temperature, activation)(_input_of(output))
    elif isinstance(last, keras.layers.Activation) and _activation(last) == "softmax":
        x = _input_of(output)
        if temperature != 1.0:
            x = keras.layers.Rescaling(1.0 / temperature, name="temperature", dtype="float32")(x)
        return keras.layers.Activation(activation, name=last.name, dtype="float32")(x)
    raise ValueError(
        f"{what}: model {model.name} does not end with a softmax (a Dense layer with activation='softmax', "
        f"or an Activation('softmax') layer) but with {type(last).__name__} {last.name!r}"
    )


def with_temperature(model: keras.Model, temperature: float) -> keras.Model:
    """``model`` with its temperature built in: the same inputs, calibrated probabilities out, from standard
    Keras layers only. A model ending with a Dense softmax layer (every bloodcell network) gets a copy of
    that layer whose kernel and bias are divided by T: softmax(logits / T), the predicted class unchanged;
    an ensemble (ending with Activation('softmax') of the log of its average) gets Rescaling(1 / T) before
    it. The other layers are shared (no copy of their weights). It saves and loads as a .keras file that
    Keras' safe mode, MLflow and the submission's model.py load without bloodcell."""
    import keras

    model = _functional(model)
    output = _softmax_output(model, float(temperature), "softmax", "temperature scaling")
    return keras.Model(model.inputs, output, name=model.name)


def log_probabilities(model: keras.Model) -> keras.Model:
    """``model`` (ending with a softmax, as in `with_temperature`) with log-probabilities out instead:
    log_softmax of the same logits (an older model's TemperatureScaling folded in). What an ensemble
    averages in log space (`bloodcell.evaluation.ensemble.build_ensemble`)."""
    import keras

    model = _functional(model)
    output = _softmax_output(model, 1.0, "log_softmax", "an ensemble member")
    return keras.Model(model.inputs, output, name=model.name)


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
