"""What a sweep leaves behind for people: the trials table, Optuna's plots and the best trial's
overrides, written into the Hydra sweep folder and logged to the MLflow parent run."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from optuna.study import Study

log = logging.getLogger(__name__)

_PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
}


def write_report(sweep: Any, trials: list[FrozenTrial], best: FrozenTrial | None, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = [_trials_table(sweep.study, folder / "trials.csv")]
    if best is not None:
        files.append(_best_yaml(sweep, best, folder / "best.yaml"))
    files += _plots(sweep.study, trials, folder / "plots")
    return files


def _trials_table(study: Study, path: Path) -> Path:
    frame = study.trials_dataframe(
        attrs=(
            "number",
            "value",
            "state",
            "params",
            "user_attrs",
            "duration",
            "datetime_start",
            "datetime_complete",
        )
    )
    frame.to_csv(path, index=False)
    return path


def _best_yaml(sweep: Any, best: FrozenTrial, path: Path) -> Path:
    from omegaconf import OmegaConf

    assert best.value is not None  # the best trial is a complete one
    overrides = list(best.user_attrs.get("overrides") or [])
    command = "python -m bloodcell.train " + " ".join(overrides)
    body = {
        "study_name": sweep.study_name,
        "trial_number": best.number,
        "objective": sweep.objective_name,
        "direction": sweep.options.direction,
        "value": float(best.value),
        "params": dict(best.params),
        "overrides": overrides,
        "command": command,
    }
    text = (
        f"# Best trial of Optuna study '{sweep.study_name}'. Re-run it with:\n#   {command}\n"
        + OmegaConf.to_yaml(OmegaConf.create(body))
    )
    path.write_text(text)
    return path


def _plots(study: Study, trials: list[FrozenTrial], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    written = []
    for name, function in _PLOTS.items():
        if not complete or (name == "param_importances" and len(complete) < 2):
            log.info(
                "no %s plot: it needs %s complete trial(s)",
                name.replace("_", "-"),
                2 if name == "param_importances" else 1,
            )
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" notices of the matplotlib backend
                axes = getattr(ovm, function)(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            path = folder / f"{name}.png"
            figure.savefig(path, dpi=100, bbox_inches="tight")
            written.append(path)
        except Exception as err:  # e.g. importances of parameters that never varied
            log.info("no %s plot: %s", name.replace("_", "-"), err)
        finally:
            plt.close("all")
    return written
