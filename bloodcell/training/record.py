"""The last step of a run: everything it keeps of its outcome, handed to the run's `Recorder` (the
objective, test and validation metrics, the figures, per-image predictions, calibration, the model and
where the time went). The figures are drawn here, by the modules that know them; the recorder only
stores what it is handed."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from bloodcell.core.settings import AbstentionSchema, DataSchema, TrackingSchema
from bloodcell.evaluation.results import TestResult
from bloodcell.evaluation.stats import interval_names
from bloodcell.tracking import Recorder
from bloodcell.training.phases import best_value

if TYPE_CHECKING:
    import keras
    import optuna

    from bloodcell.data import Arrays
    from bloodcell.data.cleaning import CleaningResult
    from bloodcell.evaluation.metrics import Evaluation
    from bloodcell.training.run_data import RunData

log = logging.getLogger("bloodcell.train")


class Stopwatch:
    """Wall seconds per part of a run, logged as ``time/seconds_<part>`` metrics: where the time outside
    Keras' fit goes (benchmarks/overhead.py reads them)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - tic

    def metrics(self) -> dict[str, float]:
        """``seconds_<part>`` per part, and ``seconds_in_train``: everything since the stopwatch started."""
        total = {"in_train": time.perf_counter() - self.started}
        return {f"seconds_{part}": value for part, value in (self.seconds | total).items()}


@dataclass
class RunContext:
    """One training run as its steps share it: its objective (the metric it returns) and ``tracking``
    settings (what it records), the data, the MLflow run's recorder, where the run keeps local files
    (checkpoints, the saved model) and the stopwatch of its parts."""

    objective: str
    tracking: TrackingSchema
    data: RunData
    recorder: Recorder
    run_dir: Path
    timed: Stopwatch
    abstention: AbstentionSchema


def record_inputs(
    recorder: Recorder, cfg: DictConfig, data_settings: DataSchema, data: RunData, overrides: list[str]
) -> None:
    """What a new run records before it trains: its config (``cfg``, whole) and overrides, its data splits
    as MLflow dataset inputs (described by its ``data`` settings), the teacher's metrics (distillation),
    the cleaning report and the images a folder data set could not read."""
    from bloodcell.data.mlflow_inputs import dataset_inputs

    recorder.log_config(cfg, overrides)
    if data.targets is not None:
        recorder.log_metrics(data.targets.metrics)
    recorder.log_inputs(dataset_inputs(data_settings, data.arrays, data.splits))
    if data.cleaning is not None:
        record_cleaning(recorder, data.cleaning, data.arrays)
    if data.arrays.skipped:  # unreadable images of a folder data set, left out with a warning
        recorder.log_skipped_images(data.arrays.skipped, data.arrays.source)


def record_cleaning(recorder: Recorder, result: CleaningResult, arrays: Arrays) -> None:
    """Counts as metrics, the JSON report and the contact sheet of removed samples (``data.clean=true``)."""
    from bloodcell.data.cleaning import contact_sheet, report_dict

    # under data/: a section of their own in the MLflow UI's charts
    recorder.log_metrics({"data/cleaning_removed": result.n_removed,
                          **{f"data/cleaning_removed_{k}": v for k, v in result.counts.items()}})  # fmt: skip
    recorder.log_dict(report_dict(result, arrays.labels, arrays.source), "cleaning/report.json")
    if result.n_removed:
        recorder.log_file(
            "cleaning/removed.png", lambda path: contact_sheet(result, arrays.images, arrays.labels, path)
        )


def record_evaluation(
    recorder: Recorder,
    evaluation: Evaluation,
    history: list[dict[str, float]] | None,
    phase2_start: int | None,
) -> None:
    """The test evaluation: its metrics, the classification report, the confusion matrix and the learning
    curves of both phases (none for a model that was not trained, ``history=None``: an ensemble)."""
    from bloodcell.evaluation.metrics import confusion_figure, curves_figure

    recorder.log_metrics(evaluation.metrics)
    recorder.log_dict(evaluation.report, "classification_report.json")
    recorder.log_figure(confusion_figure(evaluation.confusion), "plots/confusion_matrix.png")
    if history is not None:
        recorder.log_figure(curves_figure(history, phase2_start), "plots/training_curves.png")


def record_predictions(recorder: Recorder, test: Arrays, result: TestResult) -> None:
    """Both splits' per-image predictions (``predictions/<split>.npz``) and the validation split's
    accuracy and macro-F1 with their intervals (per-class figures stay in its predictions: the test split
    is where a run reports those)."""
    recorder.log_predictions(
        "test",
        test.labels,
        test.fingerprint,
        result.test_index,
        result.probabilities,
        result.split_fingerprint,
    )
    if result.val is not None:
        val = result.val
        metrics = val.evaluation.metrics
        recorder.log_metrics(
            {k: v for k, v in metrics.items() if "precision_" not in k and "recall_" not in k}
        )
        recorder.log_predictions(
            "val",
            val.arrays.labels,
            val.arrays.fingerprint,
            val.data_index,
            val.probabilities,
            result.split_fingerprint,
        )


def record_explanations(recorder: Recorder, model: keras.Model, test: Arrays, probabilities: Any) -> None:
    """What the model looked at, on the test split (``tracking.explain``): ``plots/gradcam.png`` (per class
    the most confident correct and wrong image with its Grad-CAM heat map) and ``plots/test_errors.png``
    (the most confident errors, counted in the title). A model Grad-CAM cannot explain gets a warning and
    no Grad-CAM sheet, never a failed run (`bloodcell.evaluation.gradcam`)."""
    from bloodcell.evaluation.gradcam import sheets

    for name, sheet in sheets(model, test.images, test.labels, probabilities).items():
        recorder.log_file("plots/gradcam.png" if name == "gradcam" else "plots/test_errors.png", sheet.save)


def record_calibration(
    recorder: Recorder, test: Arrays, result: TestResult, abstention: AbstentionSchema | None = None
) -> None:
    """Temperature scaling's outcome (when the run calibrated): the temperature, the expected calibration
    error of both splits before and after (``calibration/*``), the test split's reliability diagram; and,
    always, abstention (``abstention/*``) on the probabilities the run reports: per target of
    ``abstention`` (trainer.abstention), the guaranteed review threshold chosen on the validation split and
    checked on the test split, the test split's own accuracy/coverage curve (point estimates) and
    ``plots/accuracy_coverage.png``."""
    from bloodcell.evaluation import abstention as review
    from bloodcell.evaluation import calibration

    if result.temperature is not None and result.val is not None:
        labels = {"val": result.val.arrays.labels, "test": test.labels}
        after = {"val": result.val.probabilities, "test": result.probabilities}
        recorder.log_metrics(
            calibration.calibration_metrics(result.temperature, labels, result.uncalibrated, after)
        )
        recorder.log_figure(
            calibration.reliability_figure(
                result.uncalibrated["test"], result.probabilities, test.labels, result.temperature
            ),
            "plots/reliability.png",
        )
    settings = AbstentionSchema.of(abstention)
    targets = tuple(float(t) for t in settings.targets)
    recorder.log_metrics(review.abstention_metrics(result.probabilities, test.labels, targets))
    guarantees = None
    if result.val is not None:  # the calibration split: never the test split that checks the threshold
        metrics, guarantees = review.guarantee_metrics(
            (result.val.probabilities, result.val.arrays.labels),
            (result.probabilities, test.labels),
            targets,
            float(settings.confidence),
            settings.batch_cells,
        )
        recorder.log_metrics(metrics)
        for guarantee in guarantees:
            at = f"{review.metric_suffix(guarantee.target)}_accuracy"
            if guarantee.found:
                log.info(
                    "review threshold %.4f: %s; chosen on %d validation cells, it kept %.1f%% of the "
                    "test cells at %.2f%%",
                    guarantee.threshold,
                    guarantee.promise(),
                    guarantee.calibration_images,
                    100 * metrics[f"abstention/test_coverage_at_{at}"],
                    100 * metrics[f"abstention/test_kept_accuracy_at_{at}"],
                )
            else:
                log.info(
                    "no review threshold reaches %s on %d validation cells",
                    guarantee.promise().removeprefix("kept cells "),
                    guarantee.calibration_images,
                )
    recorder.log_figure(
        review.accuracy_coverage_figure(result.probabilities, test.labels, guarantees=guarantees),
        "plots/accuracy_coverage.png",
    )


def wants_explanations(setting: bool | str, study: optuna.Study | None, objective: float) -> bool:
    """Whether a run draws its Grad-CAM and error sheets (``tracking.explain``): always with true, never
    with false; with auto, every run but a sweep trial (``study``, its sweep's) whose ``objective`` does
    not beat the best finished trial of the study so far. A storage that cannot say means yes."""
    if setting != "auto" or study is None:
        return bool(setting)
    import optuna

    try:
        best = study.best_value
    except ValueError:  # no finished trial yet
        return True
    except Exception as err:  # the storage is out: drawing costs a second, skipping one loses a picture
        log.debug("could not read the study's best value: %s", err)
        return True
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return objective >= best if maximize else objective <= best


def record(
    run: RunContext,
    model: keras.Model,
    result: TestResult,
    history: list[dict[str, float]],
    phase2_start: int | None,
    study: optuna.Study | None = None,
) -> float:
    """Everything the run keeps of its outcome: the objective, test metrics and plots, the model, where the
    time went. Returns the objective. ``study``: the sweep's, for a trial (`wants_explanations`)."""
    import numpy as np

    recorder, test, timed = run.recorder, run.data.splits.test, run.timed
    objective = best_value(history, run.objective)
    with timed("evaluate"):
        recorder.log_metrics({f"best_{run.objective}": objective})
        record_evaluation(recorder, result.evaluation, history, phase2_start)
        if tta := result.tta_metrics():  # no empty request for a run without TTA
            recorder.log_metrics(tta)
        if wants_explanations(run.tracking.explain, study, objective):
            record_explanations(recorder, model, test, result.probabilities)
        elif run.tracking.explain == "auto":
            log.info(
                "no Grad-CAM or error sheets: this trial's %s %.4f does not beat the study's best "
                "(tracking.explain=auto); python -m bloodcell.explain model=runs:/%s/model draws them",
                run.objective,
                objective,
                recorder.run_id,
            )
        else:
            log.info(
                "no Grad-CAM or error sheets (tracking.explain=false); "
                "python -m bloodcell.explain model=runs:/%s/model draws them",
                recorder.run_id,
            )
        record_predictions(recorder, test, result)
        record_calibration(recorder, test, result, run.abstention)
    if run.tracking.log_model:
        with timed("log_model"):
            # the test predictions give the output example: another predict call would trace anew
            recorder.log_model(
                result.model or model,
                test.images[:2].astype(np.float32),
                result.probabilities[:2],
                run.run_dir,
            )
    seconds = timed.metrics()
    recorder.log_timings(seconds)
    metrics = result.evaluation.metrics
    low, high = interval_names("test_accuracy")
    log.info(
        "test accuracy %.4f (95%% interval %.4f-%.4f), macro-F1 %.4f; best %s %.4f; run %s "
        "(%.0f s, %.0f s in fit)",
        metrics["test_accuracy"],
        metrics[low],
        metrics[high],
        metrics["test_macro_f1"],
        run.objective,
        objective,
        recorder.run_id,
        seconds["seconds_in_train"],
        seconds.get("seconds_fit", 0.0),
    )
    return objective
