"""Two or more models on the same images: accuracy and macro-F1 with intervals, McNemar's exact test and
per-class recall differences of each model against the reference (`compare_pair`), from their stored
predictions or by predicting labelled images (`run_comparison`), with the text `compare` prints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bloodcell import CLASS_NAMES, NUM_CLASSES
from bloodcell.core.errors import UserError
from bloodcell.evaluation import stats
from bloodcell.evaluation.candidates import Candidate
from bloodcell.evaluation.stored_predictions import SPLITS, comparable, required_predictions, shared_images
from bloodcell.serving.prediction import predict_on
from bloodcell.training.run_data import labelled_images, split_images

if TYPE_CHECKING:
    pass
log = logging.getLogger("bloodcell.compare")


@dataclass
class Score:
    """One model's accuracy and macro-F1 on the compared images, each with its 95% interval."""

    images: int
    accuracy: float
    accuracy_interval: tuple[float, float]
    macro_f1: float
    macro_f1_interval: tuple[float, float]

    @classmethod
    def of(cls, labels: np.ndarray, predicted: np.ndarray) -> Score:
        from sklearn.metrics import f1_score

        correct = int(np.sum(labels == predicted))
        f1 = float(
            f1_score(labels, predicted, labels=list(range(NUM_CLASSES)), average="macro", zero_division=0)
        )
        return cls(
            len(labels),
            correct / max(len(labels), 1),
            stats.wilson(correct, len(labels)),
            f1,
            stats.macro_f1_interval(labels, predicted),
        )

    def metrics(self, prefix: str) -> dict[str, float]:
        return {
            **stats.with_interval(f"{prefix}accuracy", self.accuracy, self.accuracy_interval),
            **stats.with_interval(f"{prefix}macro_f1", self.macro_f1, self.macro_f1_interval),
        }


@dataclass
class PairComparison:
    """Model B against model A on the same images."""

    a: str
    b: str
    test: stats.PairedTest
    accuracy_delta: float
    accuracy_delta_interval: tuple[float, float]
    macro_f1_delta: float
    macro_f1_delta_interval: tuple[float, float]
    classes: list[stats.ClassDelta]
    #: rows (in the compared images) that only A gets right, and only B
    only_a: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    only_b: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    p_holm: float | None = None

    def metrics(self) -> dict[str, float]:
        prefix = f"{self.b}_vs_{self.a}_"
        out = {
            f"{prefix}mcnemar_p": self.test.p_value,
            f"{prefix}only_{self.a}_right": float(self.test.only_a),
            f"{prefix}only_{self.b}_right": float(self.test.only_b),
            **stats.with_interval(
                f"{prefix}accuracy_delta", self.accuracy_delta, self.accuracy_delta_interval
            ),
            **stats.with_interval(
                f"{prefix}macro_f1_delta", self.macro_f1_delta, self.macro_f1_delta_interval
            ),
        }
        for name, c in zip(CLASS_NAMES, self.classes):
            if c.images:
                out.update(stats.with_interval(f"{prefix}recall_delta_{name}", c.delta, c.interval))
        if self.p_holm is not None:
            out[f"{prefix}mcnemar_p_holm"] = self.p_holm
        return out


def compare_pair(labels: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray, a: str = "A",
                 b: str = "B") -> PairComparison:  # fmt: skip
    """Everything `compare` and the champion gate say about B against A on the same images."""
    right_a, right_b = predicted_a == labels, predicted_b == labels
    return PairComparison(
        a,
        b,
        stats.mcnemar(right_a, right_b),
        float(right_b.mean() - right_a.mean()),
        stats.accuracy_delta_interval(labels, predicted_a, predicted_b),
        Score.of(labels, predicted_b).macro_f1 - Score.of(labels, predicted_a).macro_f1,
        stats.macro_f1_delta_interval(labels, predicted_a, predicted_b),
        stats.recall_deltas(labels, predicted_a, predicted_b),
        np.flatnonzero(right_a & ~right_b),
        np.flatnonzero(right_b & ~right_a),
    )


@dataclass
class Comparison:
    """What `compare` found: the models, where they were compared, their scores and each pair against A."""

    models: list[Candidate]
    where: str
    labels: np.ndarray
    predicted: list[np.ndarray]
    scores: list[Score]
    pairs: list[PairComparison]
    images: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        parts = [f"compared on {self.where}", scores_text(self.models, self.scores)]
        parts += [pair_text(p) for p in self.pairs]
        parts += [f"note: {n}" for n in self.notes]
        return "\n\n".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "confidence": stats.CONFIDENCE,
            "models": [
                {
                    "name": m.name,
                    "spec": m.spec,
                    "run_id": m.run_id,
                    "experiment": m.experiment,
                    **s.metrics(""),
                }  # fmt: skip
                for m, s in zip(self.models, self.scores)
            ],
            "pairs": [
                {
                    "b": p.b,
                    "a": p.a,
                    "table": p.test.table.tolist(),
                    **p.metrics(),
                }
                for p in self.pairs
            ],
            "notes": self.notes,
        }


def run_comparison(
    client: Any,
    models: list[Candidate],
    *,
    split: str = "test",
    eval_path: str | None = None,
    allow_different: bool = False,
    sheet: bool = True,
) -> Comparison:
    if split not in SPLITS:
        raise UserError(f"split={split!r} is unknown; use test or val")
    how = comparable(models, split, allow_different, bool(eval_path))
    notes = []
    images = None
    if eval_path:
        images, labels = labelled_images(eval_path)
        predicted = [
            predict_on(m.model_uri, images, f"{m.name} ({m.describe()})").argmax(axis=1) for m in models
        ]
        where = f"eval={eval_path}: {len(labels)} images"
    else:
        fix = "compare it on eval=<npz or folder>"
        stored = [
            required_predictions(client, m.run_id, split, fix, name=f"{m.name} ({m.run_id})") for m in models
        ]
        common, rows = shared_images(stored)
        if len(common) == 0:
            raise UserError(f"the runs' {split} splits share no image")
        labels = stored[0].labels[rows[0]]
        predicted = [p.predicted[r] for p, r in zip(stored, rows)]
        first = models[0]
        where = (
            f"the {split} split: {len(common)} images"
            + (" shared by their splits (held out from all of them)" if how == "shared images" else "")
            + f", data {first.tags.get('data_source', '?')} (fingerprint {first.data_fingerprint[:12]})"
        )
        if sheet:
            try:
                images = split_images(first.run, split, common)
            except (UserError, OSError, KeyError) as err:
                notes.append(f"no contact sheet: the images could not be loaded again ({err})")
    scores = [Score.of(labels, p) for p in predicted]
    pairs = [
        compare_pair(labels, predicted[0], p, models[0].name, m.name)
        for m, p in zip(models[1:], predicted[1:])
    ]
    if len(pairs) > 1:  # several comparisons with A at once
        for pair, adjusted in zip(pairs, stats.holm([p.test.p_value for p in pairs])):
            pair.p_holm = adjusted
    return Comparison(models, where, labels, predicted, scores, pairs, images, notes)


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _interval(interval: tuple[float, float], points: bool = False) -> str:
    low, high = interval
    if points:
        return f"[{_points(low)}, {_points(high)}]"
    return f"[{low:.4f}, {high:.4f}]"


def pair_text(pair: PairComparison) -> str:
    """The contingency table, the test and the per-class recall differences, for people."""
    t, a, b = pair.test.table, pair.a, pair.b
    width = max(len(a), len(b)) + 7
    lines = [
        f"{b} vs {a}: McNemar exact p = {pair.test.p_value:.4g}"
        + (f" (Holm-adjusted {pair.p_holm:.4g})" if pair.p_holm is not None else ""),
        f"  {'':{width}} {b + ' right':>10} {b + ' wrong':>10}",
        f"  {a + ' right':{width}} {t[0, 0]:>10} {t[0, 1]:>10}",
        f"  {a + ' wrong':{width}} {t[1, 0]:>10} {t[1, 1]:>10}",
        f"  accuracy {b} - {a}: {_points(pair.accuracy_delta)} points "
        f"{_interval(pair.accuracy_delta_interval, True)}; macro-F1: {_points(pair.macro_f1_delta)} "
        f"{_interval(pair.macro_f1_delta_interval, True)}",
        f"  recall per class ({b} - {a}, points, 95% interval; images):",
    ]
    for name, c in zip(CLASS_NAMES, pair.classes):
        if not c.images:
            lines.append(f"    {name:<13} no images")
            continue
        lines.append(
            f"    {name:<13} {100 * c.recall_a:6.1f} -> {100 * c.recall_b:6.1f}  {_points(c.delta):>6} "
            f"{_interval(c.interval, True):<16} {c.images}"
        )
    return "\n".join(lines)


def scores_text(models: list[Candidate], scores: list[Score]) -> str:
    lines = [f"  {'':3}{'run':<10}{'experiment':<20}{'accuracy [95% interval]':<29}macro-F1 [95% interval]"]
    for m, s in zip(models, scores):
        lines.append(
            f"  {m.name:<3}{m.run_id[:8]:<10}{m.experiment[:19]:<20}"
            f"{s.accuracy:.4f} {_interval(s.accuracy_interval):<22}"
            f"{s.macro_f1:.4f} {_interval(s.macro_f1_interval)}"
        )
    return "\n".join(lines)
