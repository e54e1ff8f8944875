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

import logging
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from bloodcell import PROJECT_ROOT
from bloodcell.core.cli import run_or_exit
from bloodcell.evaluation.candidates import candidates
from bloodcell.evaluation.comparison import Comparison, run_comparison
from bloodcell.evaluation.comparison_report import log_comparison

if TYPE_CHECKING:
    pass

log = logging.getLogger("bloodcell.compare")


# ---- which models --------------------------------------------------------------------------------------


# ---- their predictions ---------------------------------------------------------------------------------


# ---- the figures -----------------------------------------------------------------------------------


# ---- the images behind stored predictions ------------------------------------------------------------


# ---- the command --------------------------------------------------------------------------------------


def _specs(value: Any) -> list[str]:
    """``runs`` as given: a list, or one string of comma-separated ids."""
    if value is None:
        return []
    if isinstance(value, str):
        return [s for s in (part.strip() for part in value.split(",")) if s]
    return [str(v) for v in value]


def main_task(cfg: DictConfig) -> Comparison:
    import mlflow

    from bloodcell.serving.loading import set_tracking

    set_tracking(cfg.tracking)
    client = mlflow.MlflowClient()
    models = candidates(client, _specs(cfg.runs), cfg.sweep, int(cfg.top))
    comparison = run_comparison(
        client,
        models,
        split=str(cfg.split),
        eval_path=cfg.eval,
        allow_different=bool(cfg.allow_different),
        sheet=bool(cfg.contact_sheet),
    )
    for m in models:
        print(f"{m.name} = {m.spec}: {m.describe()}")
    print()
    print(comparison.text())
    if cfg.log:
        params = {"split": cfg.split, "eval": cfg.eval, "runs": [m.run_id for m in models]}
        run_id = log_comparison(client, cfg.tracking.experiment, comparison, params)
        print(f"\nlogged as run {run_id} in experiment '{cfg.tracking.experiment}'")
    return comparison


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="compare")
def main(cfg: DictConfig) -> None:
    run_or_exit(main_task, cfg)


if __name__ == "__main__":
    main()
