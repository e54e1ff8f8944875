"""Knowledge distillation's half of a run: the teacher (a run or a registered model, checked to share the
student's data and split) and the soft targets it gives the student's training images
(``alpha * onehot + (1 - alpha) * softmax(log p / T)``). The command is `bloodcell/distill.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bloodcell import NUM_CLASSES
from bloodcell.core.errors import UserError
from bloodcell.core.settings import DistillSchema, TrackingSchema

if TYPE_CHECKING:
    from bloodcell.data import Splits
    from bloodcell.evaluation.candidates import Candidate
    from bloodcell.training.run_data import Targets
log = logging.getLogger("bloodcell.distill")


#: the teacher's figures the student's run carries for comparison (metric ``distill/teacher_<name>``)
TEACHER_METRICS = ("test_accuracy", "test_macro_f1")


def soft_targets(labels: np.ndarray, teacher: np.ndarray, alpha: float, temperature: float) -> np.ndarray:
    """float32 (N, NUM_CLASSES) rows summing to 1: ``alpha`` of the one-hot ``labels`` and ``1 - alpha`` of
    the teacher's probabilities ``teacher`` at ``temperature`` (softmax(log p / T): the teacher's logits,
    up to a constant, divided by T; above 1 it flattens them)."""
    from bloodcell.evaluation.calibration import apply_temperature

    onehot = np.eye(NUM_CLASSES)[labels]
    tempered = apply_temperature(teacher, temperature)
    return (alpha * onehot + (1 - alpha) * tempered).astype(np.float32)


@dataclass
class Teacher:
    """The model that teaches: how the user named it, the run behind it and the model to load."""

    spec: str
    run: Candidate
    model_uri: str

    def check_split(self, splits: Splits, allow_different: bool) -> bool:
        """True when the teacher was trained on the student's data and split. Otherwise a one-line
        UserError, or, with ``allow_different``, a warning and False."""
        run = self.run
        if run.data_fingerprint != splits.train.fingerprint:
            what = (
                f"teacher run {run.run_id[:8]} was trained on other data than the student "
                f"({run.tags.get('data_source', '?')}, fingerprint {run.data_fingerprint[:12] or '?'} vs "
                f"{splits.train.source}, fingerprint {splits.train.fingerprint[:12]})"
            )
            fix = "train the student on the teacher's data (its data.* overrides)"
        elif run.split_fingerprint != splits.fingerprint():
            seed = run.split_seed
            what = (
                f"teacher run {run.run_id[:8]} was trained on the student's data split differently (its "
                f"split seed {seed}, or other fractions or folds)"
            )
            fix = f"use its split (data.split_seed={seed}, its data.val_fraction, data.test_fraction)"
        else:
            return True
        leak = "it may have trained on the student's test images, inflating the student's test figures"
        if not allow_different:
            raise UserError(f"{what}: {leak}; {fix}, or distill.allow_different=true if it never saw them")
        log.warning("%s: %s (distill.allow_different=true)", what, leak)
        return False

    def metrics(self) -> dict[str, float]:
        """The teacher's own test figures, where its run logged them: on the student's test split, when
        the two share it."""
        logged = self.run.run.data.metrics
        return {f"distill/teacher_{name}": float(logged[name]) for name in TEACHER_METRICS if name in logged}

    def targets(self, distill: DistillSchema, splits: Splits) -> Targets:
        """The student's training targets and what its run records about them: the teacher's probabilities
        for the training images, computed once here on the images as they are (un-augmented). Training
        then augments an image but keeps its target: an approximation (Hinton et al. ask the teacher about
        each augmented view) that keeps the teacher, an ensemble of several models, out of the training
        loop, whose cost stays one model's."""
        from bloodcell.serving.prediction import predict_on
        from bloodcell.training.run_data import Targets

        same_split = self.check_split(splits, distill.allow_different)
        train = splits.train
        log.info("teacher %s: class probabilities for %d training images", self.spec, len(train))
        probabilities = predict_on(self.model_uri, train.images, f"teacher {self.spec}", distill.batch_size)
        alpha, temperature = float(distill.alpha), float(distill.temperature)
        tags = {
            "distill.teacher": self.spec,
            "distill.teacher_run": self.run.run_id,
            "distill.teacher_model_uri": self.model_uri,
            "distill.teacher_split": "same" if same_split else "different",
        }
        metrics = self.metrics() if same_split else {}
        # how often the teacher is right on the images it teaches: near 1 when it trained on them
        right = probabilities.argmax(axis=1) == train.labels
        metrics["distill/teacher_train_accuracy"] = float(np.mean(right))
        return Targets(soft_targets(train.labels, probabilities, alpha, temperature), tags, metrics)


def find_teacher(teacher: str, tracking: TrackingSchema) -> Teacher:
    """The teacher named by ``teacher`` (a run id, runs:/ or models:/ URI), in the store of ``tracking``:
    its run, which must have logged a model (checked before any data is read or model loaded)."""
    import mlflow

    from bloodcell.evaluation.candidates import Candidate, resolve_run
    from bloodcell.serving.loading import set_tracking

    set_tracking(tracking)
    client = mlflow.MlflowClient()
    spec = teacher.strip()
    run = resolve_run(client, spec)
    candidate = Candidate(spec, run, client.get_experiment(run.info.experiment_id).name)
    if not candidate.tags.get("model_uri"):
        raise UserError(
            f"teacher run {candidate.run_id} logged no model (trained with tracking.log_model=false?); "
            "name a run that logged one"
        )
    # a registry name teaches with the version it names; a run id, with the model its run logged
    model_uri = spec if spec.startswith(("models:/", "runs:/")) else candidate.model_uri
    return Teacher(spec, candidate, model_uri)
