"""`python -m bloodcell.compare`: two or more trained models on the same images, with intervals and a
paired test, printed as a table and logged to MLflow.

    python -m bloodcell.compare runs=[<run id>,<run id>]                   # their stored test predictions
    python -m bloodcell.compare runs=[models:/bloodcell@champion,<run id>] split=val
    python -m bloodcell.compare sweep=<parent run id> top=4                # a sweep's 4 best trials
    python -m bloodcell.compare runs=[<run id>,<run id>] eval=held_out.npz  # predict other labelled images

Every training run keeps its final model's class probabilities on the validation and test splits
(``predictions/<split>.npz``), so runs on the same data and split are compared image by image without
running them again. The first model named is the reference (A); every other one is compared with it:
accuracy and macro-F1 with their 95% intervals, McNemar's exact test on the images only one of the two
gets right, per-class recall differences with paired intervals, and a contact sheet of those images.

Runs trained on different data (fingerprints) or different splits are refused, in one line, unless
``allow_different=true``: then same-data runs are compared on the images their splits share (held out
from both), and runs of different data only on ``eval=`` images.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig

from bloodcell import CLASS_NAMES, NUM_CLASSES, PROJECT_ROOT, stats
from bloodcell.cli import run_or_exit
from bloodcell.errors import UserError

if TYPE_CHECKING:
    from bloodcell.train import RunData

log = logging.getLogger("bloodcell.compare")

SPLITS = ("test", "val")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ---- which models --------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One model to compare: the training run it came from, and how the user named it."""

    spec: str
    run: Any  # mlflow.entities.Run
    experiment: str
    name: str = ""  # A, B, ... in the order given

    @property
    def run_id(self) -> str:
        return str(self.run.info.run_id)

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.run.data.tags)

    @property
    def data_fingerprint(self) -> str:
        """The data the splits were cut from: the cleaned set's when the run cleaned its data."""
        return self.tags.get("data_fingerprint_cleaned") or self.tags.get("data_fingerprint", "")

    @property
    def split_fingerprint(self) -> str:
        return self.tags.get("split_fingerprint", "")

    @property
    def model_uri(self) -> str:
        return self.tags.get("model_uri") or f"runs:/{self.run_id}/model"

    def describe(self) -> str:
        """Where the model came from, for people: run, experiment, data, split seed."""
        seed, source = self.run.data.params.get("seed", "?"), self.tags.get("data_source", "?")
        return (
            f"run {self.run_id[:8]} (experiment '{self.experiment}', data {source}, "
            f"fingerprint {self.data_fingerprint[:12] or '?'}, seed {seed})"
        )


def resolve_run(client: Any, spec: str) -> Any:
    """The training run behind a run id, ``runs:/<id>/...``, ``models:/<name>@<alias>``,
    ``models:/<name>/<version>`` or ``models:/<logged model id>``."""
    from mlflow.exceptions import MlflowException

    spec = str(spec).strip()
    run_id: str | None
    try:
        if spec.startswith("runs:/"):
            run_id = spec[len("runs:/") :].split("/", 1)[0]
        elif spec.startswith("models:/"):
            ref = spec[len("models:/") :].strip("/")
            if ref.startswith("m-") and "/" not in ref and "@" not in ref:
                run_id = client.get_logged_model(ref).source_run_id
            elif "@" in ref:
                name, alias = ref.split("@", 1)
                run_id = client.get_model_version_by_alias(name, alias).run_id
            else:
                name, version = ref.rsplit("/", 1)
                run_id = client.get_model_version(name, version).run_id
        else:
            run_id = spec
        if not run_id:
            raise UserError(f"{spec} names no training run (a model registered from outside bloodcell?)")
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(
            f"{spec!r} is not a run id, runs:/<id> or models:/<name>@<alias> | /<version> in this tracking "
            "store (check it, or tracking.uri)"
        ) from None


def sweep_top(client: Any, parent_id: str, top: int) -> list[Any]:
    """The ``top`` best FINISHED trial runs of a sweep, best first, by the sweep's objective."""
    from mlflow.exceptions import MlflowException

    try:
        parent = client.get_run(parent_id)
    except MlflowException:
        raise UserError(f"sweep={parent_id!r} is not a run id in this tracking store") from None
    objective = parent.data.params.get("objective", "val_accuracy")
    metric = f"best_{objective}"
    lower = parent.data.params.get("direction", "maximize") == "minimize"
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'",
        max_results=5000,
    )
    # an ensemble logged under the sweep (bloodcell.ensemble) is made of trials, it is not one
    scored = [r for r in runs if metric in r.data.metrics and "bloodcell.ensemble" not in r.data.tags]
    if len(scored) < 2:
        raise UserError(f"sweep {parent_id} has {len(scored)} FINISHED trial(s) with {metric}; 2 are needed")
    scored.sort(key=lambda r: r.data.metrics[metric], reverse=not lower)
    return scored[: max(int(top), 2)]


def candidates(
    client: Any, specs: list[str], sweep: str | None = None, top: int = 4, command: str = "compare"
) -> list[Candidate]:
    runs = [(spec, resolve_run(client, spec)) for spec in specs]
    if sweep:
        runs += [(f"trial {r.data.tags.get('trial_number', '?')}", r) for r in sweep_top(client, sweep, top)]
    if len(runs) < 2:
        raise UserError(
            f"{command} needs two models at least: runs=[<run id>,<run id>] (run ids, runs:/..., "
            "models:/...), or sweep=<parent run id> top=<k>"
        )
    experiments: dict[str, str] = {}
    out = []
    for i, (spec, run) in enumerate(runs):
        eid = run.info.experiment_id
        if eid not in experiments:
            experiments[eid] = client.get_experiment(eid).name
        out.append(
            Candidate(spec, run, experiments[eid], LETTERS[i % len(LETTERS)] * (1 + i // len(LETTERS)))
        )
    return out


# ---- their predictions ---------------------------------------------------------------------------------


@dataclass
class Predictions:
    """One model's class probabilities on a set of images."""

    labels: np.ndarray  # (N,) int64
    probabilities: np.ndarray  # (N, 8) float32
    #: position of each image in the data set the split was cut from (stored predictions), or in eval=
    data_index: np.ndarray
    #: position of each image within the split (stored predictions), or in eval=
    index: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)


def stored_predictions(client: Any, run_id: str, split: str = "test") -> Predictions | None:
    """A run's ``predictions/<split>.npz``; None when it has none (a run from before they were kept)."""
    import os

    import mlflow

    from bloodcell.tracking import predictions_path

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a file of kilobytes
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=predictions_path(split),
                dst_path=tmp,
                tracking_uri=client.tracking_uri,
            )
        except Exception:  # no such artifact (MLflow raises several kinds)
            return None
        with np.load(path, allow_pickle=False) as npz:
            return Predictions(
                npz["labels"].astype(np.int64),
                npz["probabilities"].astype(np.float32),
                npz["data_index"].astype(np.int64),
                npz["index"].astype(np.int64),
            )


def required_predictions(
    client: Any, run_id: str, split: str, fix: str, name: str | None = None
) -> Predictions:
    """`stored_predictions`, or one line saying the run kept none and what to do instead (``fix``)."""
    stored = stored_predictions(client, run_id, split)
    if stored is None:
        what = {"val": "validation"}.get(split, split)
        raise UserError(
            f"run {name or run_id} kept no {what} predictions (trained before runs kept them): {fix}"
        )
    return stored


def shared_images(predictions: list[Predictions]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The images every prediction set covers (by position in the common data set), and for each set the
    rows of those images, in the first set's order."""
    common = predictions[0].data_index
    for p in predictions[1:]:
        common = common[np.isin(common, p.data_index)]
    rows = []
    for p in predictions:
        where = {int(d): i for i, d in enumerate(p.data_index)}
        rows.append(np.array([where[int(d)] for d in common], dtype=np.int64))
    labels = [p.labels[r] for p, r in zip(predictions, rows)]
    if any(not np.array_equal(labels[0], other) for other in labels[1:]):
        raise UserError(
            "the runs' stored predictions disagree on the labels of the same images: they were not trained "
            "on the same data, whatever their fingerprints say"
        )
    return common, rows


def comparable(models: list[Candidate], split: str, allow_different: bool, on_eval: bool) -> str:
    """Whether the models can be compared image by image; raises a one-line UserError when not (unless
    ``allow_different``). Returns how: 'same split', 'shared images' (same data, other splits) or 'eval'."""
    first = models[0]
    other_data = [m for m in models[1:] if m.data_fingerprint != first.data_fingerprint]
    if other_data:
        m = other_data[0]
        what = (
            f"runs {first.name} and {m.name} were trained on different data: {first.name} on "
            f"{first.tags.get('data_source', '?')} (fingerprint {first.data_fingerprint[:12] or '?'}), "
            f"{m.name} on {m.tags.get('data_source', '?')} (fingerprint {m.data_fingerprint[:12] or '?'})"
        )
        if not on_eval:
            raise UserError(
                f"{what}; they share no {split} images: compare them on labelled images with "
                "eval=<npz or folder> allow_different=true"
            )
        if not allow_different:
            raise UserError(
                f"{what}; either may have trained on some of the eval images: pass allow_different=true to "
                "compare them there anyway"
            )
        return "eval"
    if on_eval:
        return "eval"
    other_split = [m for m in models[1:] if m.split_fingerprint != first.split_fingerprint]
    if other_split:
        m = other_split[0]
        seeds = f"seed {first.run.data.params.get('seed', '?')} vs {m.run.data.params.get('seed', '?')}"
        if not allow_different:
            raise UserError(
                f"runs {first.name} and {m.name} were trained on the same data but split differently "
                f"({seeds}, or other fractions): their {split} splits differ; compare them on the images "
                "both splits share (held out from both) with allow_different=true, or on eval=<npz or folder>"
            )
        return "shared images"
    return "same split"


# ---- the figures -----------------------------------------------------------------------------------


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


def disagreement_sheet(
    images: np.ndarray,
    labels: np.ndarray,
    predicted_a: np.ndarray,
    predicted_b: np.ndarray,
    pair: PairComparison,
    path: Path,
    limit: int = 48,
    columns: int = 12,
) -> Path:
    """A PNG of the images one model gets right and the other wrong: two blocks, each tile captioned with
    the true class and the wrong model's answer."""
    from PIL import Image, ImageDraw

    tile, caption, header = 72, 24, 18
    blocks = [
        (f"only {pair.b} right ({len(pair.only_b)}; {pair.a} said ...)", pair.only_b[:limit], predicted_a),
        (f"only {pair.a} right ({len(pair.only_a)}; {pair.b} said ...)", pair.only_a[:limit], predicted_b),
    ]
    height = sum(header + max(1, -(-len(rows) // columns)) * (tile + caption) for _, rows, _ in blocks)
    sheet = Image.new("RGB", (columns * tile, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for title, rows, wrong in blocks:
        draw.text((4, y + 3), title, fill=(0, 0, 0))
        y += header
        for k, row in enumerate(rows):
            r, c = divmod(k, columns)
            x0, y0 = c * tile, y + r * (tile + caption)
            sheet.paste(Image.fromarray(images[row]).resize((tile, tile), Image.Resampling.NEAREST), (x0, y0))
            draw.text((x0 + 2, y0 + tile), CLASS_NAMES[labels[row]][:11], fill=(0, 120, 0))
            draw.text((x0 + 2, y0 + tile + 11), CLASS_NAMES[wrong[row]][:11], fill=(200, 0, 0))
        y += max(1, -(-len(rows) // columns)) * (tile + caption)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# ---- the images behind stored predictions ------------------------------------------------------------


def run_config(run: Any) -> DictConfig:
    """The resolved config a run logged (``config.yaml``); raises UserError when it has none."""
    import mlflow
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.create(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml"))
    except Exception as err:
        raise UserError(f"run {run.info.run_id} has no config.yaml to load its data from ({err})") from None
    if not isinstance(cfg, DictConfig):
        raise UserError(f"run {run.info.run_id}'s config.yaml is not a mapping")
    return cfg


def run_splits(run: Any) -> RunData:
    """A run's data and splits, loaded again from its config and checked against its split fingerprint;
    raises UserError when they cannot be had."""
    from bloodcell.train import load_splits

    data = load_splits(run_config(run))
    if data.splits.fingerprint() != run.data.tags.get("split_fingerprint"):
        raise UserError(
            f"the data of run {run.info.run_id} ({data.arrays.source}) has changed since it trained"
        )
    return data


def split_images(run: Any, split: str, data_index: np.ndarray) -> np.ndarray:
    """The images at ``data_index`` of a run's data, loaded again from its config (``config.yaml``) and
    checked against its split fingerprint; raises UserError when they cannot be had."""
    data = run_splits(run)
    part = getattr(data.splits, split)
    where = {int(d): i for i, d in enumerate(data.splits.positions(split))}
    return part.images[[where[int(d)] for d in data_index]]


# ---- the command --------------------------------------------------------------------------------------


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


def labelled_images(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of an npz (``images``, ``labels``) or a folder with one sub-folder per class,
    read and validated as training data is."""
    from omegaconf import OmegaConf

    from bloodcell.data import load_arrays, resolve_path

    where = resolve_path(path)
    if not where.exists():
        raise UserError(
            f"eval={path} not found; give a labelled .npz or a folder with one sub-folder per class"
        )
    fmt = "folder" if where.is_dir() else "npz"
    arrays = load_arrays(OmegaConf.create({"format": fmt, "path": str(where)}))
    return arrays.images, arrays.labels


def predict_on(model_uri: str, images: np.ndarray, who: str, batch_size: int = 64) -> np.ndarray:
    """Class probabilities of the model at ``model_uri`` on uint8 images. A model trained on another image
    size cannot take them: UserError (images are not resized here: resizing changes what a cell looks like
    to the model, and a comparison should show each model the images as it was trained to see them)."""
    from bloodcell.predict import load_model, model_image_shape, predict_arrays

    keras_model = load_model(model_uri)
    height, width = model_image_shape(keras_model)[:2]
    if (height and height != images.shape[1]) or (width and width != images.shape[2]):
        raise UserError(
            f"{who} takes {height}x{width} images and cannot take these "
            f"{images.shape[1]}x{images.shape[2]} ones"
        )
    return predict_arrays(keras_model, images, batch_size)


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


def log_comparison(client: Any, experiment: str, comparison: Comparison, params: dict[str, Any]) -> str:
    """The comparison as an MLflow run of its own: figures as metrics, the table, a JSON and the sheets."""
    from bloodcell.tracking import artifact_location, record_to

    found = client.get_experiment_by_name(experiment)
    eid = (
        found.experiment_id
        if found is not None
        else client.create_experiment(experiment, artifact_location=artifact_location(client.tracking_uri))
    )
    names = "-".join(m.run_id[:6] for m in comparison.models)
    run = client.create_run(eid, run_name=f"compare-{names}", tags={"bloodcell.compare": "true"})
    metrics: dict[str, float] = {}
    for m, s in zip(comparison.models, comparison.scores):
        metrics.update(s.metrics(f"{m.name}_"))
    for p in comparison.pairs:
        metrics.update(p.metrics())
    tags = {
        f"compare.{m.name}": f"{m.run_id} ({m.spec}, experiment {m.experiment})" for m in comparison.models
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "comparison.txt").write_text(comparison.text() + "\n")
        (folder / "comparison.json").write_text(json.dumps(comparison.as_dict(), indent=2))
        artifacts: list[tuple[Path, str | None]] = [
            (folder / "comparison.txt", None),
            (folder / "comparison.json", None),
        ]
        if comparison.images is not None:
            for pair, predicted in zip(comparison.pairs, comparison.predicted[1:]):
                path = folder / f"disagreements_{pair.b}_vs_{pair.a}.png"
                disagreement_sheet(
                    comparison.images, comparison.labels, comparison.predicted[0], predicted, pair, path
                )
                artifacts.append((path, "plots"))
        record_to(
            run.info.run_id,
            params={k: str(v)[:6000] for k, v in params.items()},
            tags=tags,
            metrics=metrics,
            artifacts=artifacts,
            status="FINISHED",
        )
    return str(run.info.run_id)


def _specs(value: Any) -> list[str]:
    """``runs`` as given: a list, or one string of comma-separated ids."""
    if value is None:
        return []
    if isinstance(value, str):
        return [s for s in (part.strip() for part in value.split(",")) if s]
    return [str(v) for v in value]


def main_task(cfg: DictConfig) -> Comparison:
    import mlflow

    from bloodcell.predict import set_tracking

    set_tracking(cfg.tracking)
    client = mlflow.MlflowClient()
    models = candidates(client, _specs(cfg.runs), cfg.get("sweep"), int(cfg.top))
    comparison = run_comparison(
        client,
        models,
        split=str(cfg.split),
        eval_path=cfg.get("eval"),
        allow_different=bool(cfg.allow_different),
        sheet=bool(cfg.contact_sheet),
    )
    for m in models:
        print(f"{m.name} = {m.spec}: {m.describe()}")
    print()
    print(comparison.text())
    if cfg.log:
        params = {"split": cfg.split, "eval": cfg.get("eval"), "runs": [m.run_id for m in models]}
        run_id = log_comparison(client, cfg.tracking.experiment, comparison, params)
        print(f"\nlogged as run {run_id} in experiment '{cfg.tracking.experiment}'")
    return comparison


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="compare")
def main(cfg: DictConfig) -> None:
    run_or_exit(main_task, cfg)


if __name__ == "__main__":
    main()
