"""`python -m bloodcell.distill`: one model trained on a teacher's soft labels as well as the true ones
(knowledge distillation), so that a single fast model keeps most of an ensemble's accuracy at one model's
inference cost.

    python -m bloodcell.distill teacher=<ensemble run id> +experiment=mobilenet_cpu
    python -m bloodcell.distill teacher=models:/bloodcell@champion +experiment=mobilenet_cpu distill.alpha=0.3

The student is an ordinary training run (`bloodcell.training.recipe.train`: the same config and steps, both
phases, checkpoints and resume, calibration, every record), so promote, predict and submit take it like any
run, and its saved model has no layer a plain run's lacks. Only what its training images learn differs: each
learns ``alpha * onehot(label) + (1 - alpha) * softmax(log p / T)``, where ``p`` is the teacher's class
probabilities for that image, with the categorical cross-entropy every run uses (Hinton, Vinyals & Dean
2015, "Distilling the knowledge in a neural network", in its simplest form: one loss on mixed targets, the
student's own softmax at temperature 1). Class weights, MixUp and CutMix apply to these targets as they do
to one-hot labels (Keras weighs each image by its target's top class). Validation keeps the true labels, so
early stopping, the objective, calibration and every test figure judge the student as any run.

The teacher's run must share the student's data and split (tags ``data_fingerprint``,
``split_fingerprint``): a teacher that trained on the student's test images would pass on what it learned
from them, and the student's test figures would flatter it. ``distill.allow_different=true`` teaches anyway.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from bloodcell import PROJECT_ROOT
from bloodcell.core.cli import exit_now, run_or_exit
from bloodcell.core.errors import UserError
from bloodcell.training.distillation import find_teacher

if TYPE_CHECKING:
    from bloodcell.core.settings import DistillRunSchema

log = logging.getLogger("bloodcell.distill")


def check_config(cfg: DictConfig) -> DistillRunSchema:
    """The training config and the distill section, in one pass (bloodcell.core.settings); one student.
    Returns the settings, which the student's run reads (`bloodcell.training.recipe.train` does not check
    them again)."""
    from bloodcell.core.settings import DistillRunSchema
    from bloodcell.training.recipe import check_config as check_train_config
    from bloodcell.training.repeats import plan

    if not cfg.teacher:
        raise UserError(
            "say which model teaches: teacher=<run id> | models:/<name>@<alias> | models:/<name>/<version>, "
            "e.g. the run id an ensemble printed"
        )
    settings = check_train_config(cfg, DistillRunSchema)
    kind, count = plan(settings)
    if kind:  # a fold's split is not its teacher's, and repeats would each need a teacher of their split
        raise UserError(
            f"distill trains one student, not {count} {kind}s: drop data.cv.folds and hydra.sweeper.repeats"
        )
    return settings


def distill(cfg: DictConfig) -> float:
    """Check the config, find the teacher, then train the student on its soft labels; returns the
    student's objective, as `bloodcell.train.train` does."""
    from bloodcell.training.recipe import train

    settings = check_config(cfg)
    teacher = find_teacher(settings.teacher, settings.tracking)
    return train(cfg, targets=lambda splits: teacher.targets(settings.distill, splits), settings=settings)


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="distill")
def main(cfg: DictConfig) -> float:
    return run_or_exit(distill, cfg)


if __name__ == "__main__":
    main()
    exit_now()  # done: skip the interpreter's teardown
