"""Final evaluation on the held-out test split: metrics (sklearn), confusion matrix and curve plots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bloodcell import CLASS_NAMES, NUM_CLASSES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PER_CLASS = "per_class/"


@dataclass
class Evaluation:
    #: <prefix>accuracy, <prefix>macro_f1 with their 95% intervals (names: `stats.interval_names`),
    #: per_class/<prefix>precision_<class>, per_class/<prefix>recall_<class> (under per_class/: a section
    #: of their own in the MLflow UI's charts, apart from the learning curves)
    metrics: dict[str, float]
    report: dict  # sklearn classification_report (output_dict=True), each class with recall_ci_low/high
    confusion: np.ndarray  # (8, 8) counts, rows = true class


def evaluate_predictions(labels: np.ndarray, probabilities: np.ndarray, prefix: str = "test_") -> Evaluation:
    """Metrics of one split's predictions, each headline figure with its 95% interval: Wilson for accuracy
    and per-class recall, a bootstrap over images for macro-F1 (`bloodcell.evaluation.stats`)."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    from bloodcell.evaluation import stats

    predicted = probabilities.argmax(axis=1)
    classes = list(range(NUM_CLASSES))
    report = classification_report(
        labels, predicted, labels=classes, target_names=list(CLASS_NAMES), output_dict=True, zero_division=0
    )
    accuracy = float(accuracy_score(labels, predicted))
    macro_f1 = float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0))
    metrics = {
        **stats.with_interval(
            f"{prefix}accuracy", accuracy, stats.wilson(int(np.sum(predicted == labels)), len(labels))
        ),
        **stats.with_interval(f"{prefix}macro_f1", macro_f1, stats.macro_f1_interval(labels, predicted)),
    }
    for name, (low, high) in zip(CLASS_NAMES, stats.recall_intervals(labels, predicted)):
        metrics[f"{PER_CLASS}{prefix}precision_{name}"] = float(report[name]["precision"])
        metrics[f"{PER_CLASS}{prefix}recall_{name}"] = float(report[name]["recall"])
        report[name]["recall_ci_low"], report[name]["recall_ci_high"] = low, high
    report["intervals"] = (
        f"{stats.CONFIDENCE:.0%} intervals: recall and accuracy Wilson score, macro-F1 percentile bootstrap "
        f"over images ({stats.RESAMPLES} resamples)"
    )
    return Evaluation(metrics, report, confusion_matrix(labels, predicted, labels=classes))


def confusion_figure(confusion: np.ndarray, title: str = "Test confusion matrix") -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(7, 6))
    ConfusionMatrixDisplay(confusion, display_labels=list(CLASS_NAMES)).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45
    )
    ax.set_title(title)
    fig.tight_layout()
    return fig


def curves_figure(history: list[dict[str, float]], phase2_start: int | None) -> Figure:
    """Loss and accuracy per epoch for train and validation; a dashed line where fine-tuning starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, metric in zip(axes, ("loss", "accuracy", "learning_rate")):
        for split, style in (("train_", "-"), ("val_", "--"), ("", "-")):
            key = f"{split}{metric}"
            if any(key in h for h in history):
                ax.plot(
                    epochs,
                    [h.get(key, np.nan) for h in history],
                    style,
                    marker=".",
                    label=key if split else metric,
                )
        if phase2_start is not None:
            ax.axvline(phase2_start - 0.5, color="grey", linestyle=":", label="fine-tuning starts")
        ax.set_xlabel("epoch")
        ax.set_title(metric.replace("_", " "))
        ax.legend()
    fig.tight_layout()
    return fig
