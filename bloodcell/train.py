"""`python -m bloodcell.train`: one tracked, two-phase training run, composed by Hydra.

    python -m bloodcell.train +experiment=quickstart            # built-in demo data, CPU, minutes
    python -m bloodcell.train +experiment=effnetb2              # the reference recipe
    python -m bloodcell.train -m +sweeps=quick                  # an Optuna sweep (sweeps/quick.yaml)

The recipe itself is `bloodcell.training.recipe.train`; a sweep trial with ``repeats`` or ``data.cv``
runs it once per member (`bloodcell.training.repeats`). Returns the objective for a sweeper.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bloodcell import PROJECT_ROOT
from bloodcell.core.cli import exit_now, run_or_exit


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="train")
def main(cfg: DictConfig) -> float:
    from bloodcell.training.repeats import train_members  # one run, or a trial's repeats / folds in turn

    return run_or_exit(train_members, cfg)


if __name__ == "__main__":
    main()
    exit_now()  # done: skip the interpreter's teardown
