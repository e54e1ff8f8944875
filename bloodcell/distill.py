"""`python -m bloodcell.distill`: one model trained on a teacher's soft labels as well as the true ones
(knowledge distillation), so that a single fast model keeps most of an ensemble's accuracy at one model's
inference cost.

    python -m bloodcell.distill teacher=<ensemble run id> +experiment=mobilenet_cpu
    python -m bloodcell.distill teacher=models:/bloodcell@champion +experiment=mobilenet_cpu distill.alpha=0.3

The student is an ordinary training run (`bloodcell.train.train`: the same config and steps, both phases,
checkpoints and resume, calibration, every record), so promote, predict and submit take it like any run,
and its saved model has no layer a plain run's lacks. Only what its training images learn differs: each
learns ``alpha * onehot(label) + (1 - alpha) * softmax(log p / T)``, where ``p`` is the teacher's class
probabilities for that image, with the categorical cross-entropy every run uses (Hinton, Vinyals & Dean
2015, "Distilling the knowledge in a neural network", in its simplest form: one loss on mixed targets, the
student's own softmax at temperature 1). Class weights, MixUp and CutMix apply to these targets as they do
to one-hot labels (Keras weighs each image by its target's top class). Validation keeps the true labels,
so early stopping, the objective, calibration and every test figure judge the student as any run.

The teacher's run must share the student's data and split (tags ``data_fingerprint``,
``split_fingerprint``): a teacher that trained on the student's test images would pass on what it learned
from them, and the student's test figures would flatter it. ``distill.allow_different=true`` teaches anyway.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import hydra
import numpy as np
from omegaconf import DictConfig

from bloodcell import NUM_CLASSES, PROJECT_ROOT
from bloodcell.cli import run_or_exit
from bloodcell.errors import UserError

if TYPE_CHECKING:
    from bloodcell.compare import Candidate
    from bloodcell.data import Splits
    from bloodcell.train import Targets

log = logging.getLogger("bloodcell.distill")

#: the teacher's figures the student's run carries for comparison (metric ``distill/teacher_<name>``)
TEACHER_METRICS = ("test_accuracy", "test_macro_f1")


def soft_targets(labels: np.ndarray, teacher: np.ndarray, alpha: float, temperature: float) -> np.ndarray:
    """float32 (N, NUM_CLASSES) rows summing to 1: ``alpha`` of the one-hot ``labels`` and ``1 - alpha`` of
    the teacher's probabilities ``teacher`` at ``temperature`` (softmax(log p / T): the teacher's logits,
    up to a constant, divided by T; above 1 it flattens them)."""
    from bloodcell.calibration import apply_temperature

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
            seed = run.run.data.params.get("seed", "?")
            what = (
                f"teacher run {run.run_id[:8]} was trained on the student's data split differently (its "
                f"seed {seed}, or other fractions or folds)"
            )
            fix = f"use its split (seed={seed}, its data.split_seed, data.val_fraction, data.test_fraction)"
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

    def targets(self, cfg: DictConfig, splits: Splits) -> Targets:
        """The student's training targets and what its run records about them: the teacher's probabilities
        for the training images, computed once here on the images as they are (un-augmented). Training
        then augments an image but keeps its target: an approximation (Hinton et al. ask the teacher about
        each augmented view) that keeps the teacher, an ensemble of several models, out of the training
        loop, whose cost stays one model's."""
        from bloodcell.compare import predict_on
        from bloodcell.train import Targets

        same_split = self.check_split(splits, bool(cfg.distill.allow_different))
        train = splits.train
        log.info("teacher %s: class probabilities for %d training images", self.spec, len(train))
        probabilities = predict_on(
            self.model_uri, train.images, f"teacher {self.spec}", int(cfg.distill.batch_size)
        )
        alpha, temperature = float(cfg.distill.alpha), float(cfg.distill.temperature)
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


def find_teacher(cfg: DictConfig) -> Teacher:
    """The teacher named by ``cfg.teacher``: its run, which must have logged a model (checked before any
    data is read or model loaded)."""
    import mlflow

    from bloodcell.compare import Candidate, resolve_run
    from bloodcell.predict import set_tracking

    set_tracking(cfg.tracking)
    client = mlflow.MlflowClient()
    spec = str(cfg.teacher).strip()
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


def check_config(cfg: DictConfig) -> None:
    """The training config and the distill section, in one pass (bloodcell.config_schema); one student."""
    from bloodcell.config_schema import DistillRunSchema, check_train_config
    from bloodcell.repeats import plan

    if not cfg.get("teacher"):
        raise UserError(
            "say which model teaches: teacher=<run id> | models:/<name>@<alias> | models:/<name>/<version>, "
            "e.g. the run id an ensemble printed"
        )
    check_train_config(cfg, DistillRunSchema)
    kind, count = plan(cfg)
    if kind:  # a fold's split is not its teacher's, and repeats would each need a teacher of their split
        raise UserError(
            f"distill trains one student, not {count} {kind}s: drop data.cv.folds and hydra.sweeper.repeats"
        )


def distill(cfg: DictConfig) -> float:
    """Check the config, find the teacher, then train the student on its soft labels; returns the
    student's objective, as `bloodcell.train.train` does."""
    from bloodcell.train import train

    check_config(cfg)
    teacher = find_teacher(cfg)
    return train(cfg, targets=lambda splits: teacher.targets(cfg, splits))


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="distill")
def main(cfg: DictConfig) -> float:
    return run_or_exit(distill, cfg)


if __name__ == "__main__":
    main()
