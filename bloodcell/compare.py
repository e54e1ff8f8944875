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

import hydra
from omegaconf import DictConfig

from bloodcell import PROJECT_ROOT
from bloodcell.core.cli import exit_now, run_or_exit
from bloodcell.evaluation.comparison_report import ComparedRuns, compare_configured


def main_task(cfg: DictConfig) -> ComparedRuns:
    compared = compare_configured(cfg)  # the library's, as bloodcell.api.compare calls it
    for m in compared.comparison.models:
        print(f"{m.name} = {m.spec}: {m.describe()}")
    print()
    print(compared.comparison.text())
    if compared.run_id:
        print(f"\nlogged as run {compared.run_id} in experiment '{cfg.tracking.experiment}'")
    return compared


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="compare")
def main(cfg: DictConfig) -> None:
    run_or_exit(main_task, cfg)


if __name__ == "__main__":
    main()
    exit_now()  # done: skip the interpreter's teardown
