"""What a sweep leaves behind for people: the trials table, Optuna's plots and the best trial's
overrides, written into the Hydra sweep folder and logged to the MLflow parent run.

The table carries each trial's 95% intervals (validation and test accuracy and macro-F1, from its MLflow
run) and says which trials are statistically indistinguishable from the best: McNemar's exact test on the
validation predictions each trial's run keeps, against the best trial, Holm-adjusted over the trials, so
that a sweep whose top 4 are a tie says so instead of naming one winner."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from . import _parent_run

if TYPE_CHECKING:
    from optuna.study import Study

log = logging.getLogger(__name__)

_PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
}


#: a trial is tied with the best when the Holm-adjusted McNemar p-value against it is at least this
TIE_ALPHA = 0.05
#: the figures of each trial's run that trials.csv carries, each with its 95% interval
INTERVAL_METRICS = ("final_val_accuracy", "final_val_macro_f1", "test_accuracy", "test_macro_f1")


def write_report(sweep: Any, trials: list[FrozenTrial], best: FrozenTrial | None, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    noise = None
    parent = getattr(sweep, "mlflow", None)
    if parent is not None and best is not None:
        try:
            maximize = getattr(getattr(sweep, "options", None), "direction", "maximize") != "minimize"
            noise = sweep_noise(parent.client, _parent_run.children(parent), trials, best, maximize)
        except Exception as err:  # the table and plots matter more: say what is missing and go on
            log.warning("no intervals or ties in the sweep report: %s", err, exc_info=True)
    files = [_trials_table(sweep.study, folder / "trials.csv", noise)]
    if best is not None:
        files.append(_best_yaml(sweep, best, folder / "best.yaml"))
    if noise is not None and parent is not None:
        files.append(_noise_text(noise, folder / "noise.txt"))
        log.info("%s", noise.summary)
        _record_noise(parent.run_id, noise)
    files += _plots(sweep.study, trials, folder / "plots")
    return files


@dataclass
class Noise:
    """What the sweep's trials say beyond their objective values: each trial's intervals and whether it is
    distinguishable from the best on the validation images."""

    best: int
    #: trial number -> column -> value (the interval metrics, p_vs_best, p_vs_best_holm, tied_with_best)
    columns: dict[int, dict[str, Any]] = field(default_factory=dict)
    tied: list[int] = field(default_factory=list)  # best first, then by objective
    summary: str = ""
    best_metrics: dict[str, float] = field(default_factory=dict)


def _trial_runs(children: list[Any]) -> dict[int, Any]:
    """trial number -> its FINISHED MLflow run (the latest, should a trial have been re-run)."""
    runs: dict[int, Any] = {}
    for run in sorted(children, key=lambda r: r.info.start_time or 0):
        number = run.data.tags.get("trial_number", "")
        if number.isdigit() and run.info.status == "FINISHED":
            runs[int(number)] = run
    return runs


def sweep_noise(
    client: Any, children: list[Any], trials: list[FrozenTrial], best: FrozenTrial, maximize: bool = True
) -> Noise:
    """Intervals per trial and the trials tied with ``best`` (see the module doc)."""
    import numpy as np

    from bloodcell.evaluation import stats
    from bloodcell.evaluation.stored_predictions import shared_images, stored_predictions

    runs = _trial_runs(children)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    noise = Noise(best.number)
    for t in complete:
        run = runs.get(t.number)
        metrics = run.data.metrics if run is not None else {}
        row: dict[str, Any] = {}
        for name in INTERVAL_METRICS:
            for key in (name, *stats.interval_names(name)):
                row[key] = metrics.get(key, math.nan)
        noise.columns[t.number] = row
    best_run = runs.get(best.number)
    best_val = stored_predictions(client, best_run.info.run_id, "val") if best_run is not None else None
    if best_run is not None:
        noise.best_metrics = {k: v for k, v in noise.columns[best.number].items() if math.isfinite(v)}
    others = [t for t in complete if t.number != best.number]
    tested: list[tuple[int, float]] = []
    for t in others:
        run = runs.get(t.number)
        if best_val is None or best_run is None or run is None:
            continue
        if run.data.tags.get("split_fingerprint") != best_run.data.tags.get("split_fingerprint"):
            continue  # other validation images (the seed or the data was searched): no paired test
        val = stored_predictions(client, run.info.run_id, "val")
        if val is None:
            continue
        _, (rows_best, rows_t) = shared_images([best_val, val])
        labels = best_val.labels[rows_best]
        test = stats.mcnemar(best_val.predicted[rows_best] == labels, val.predicted[rows_t] == labels)
        tested.append((t.number, test.p_value))
    adjusted = dict(zip([n for n, _ in tested], stats.holm([p for _, p in tested])))
    raw = dict(tested)
    for t in complete:
        row = noise.columns[t.number]
        row["p_vs_best"] = raw.get(t.number, math.nan)
        row["p_vs_best_holm"] = adjusted.get(t.number, math.nan)
        if t.number == best.number:
            row["tied_with_best"] = "best"
        elif t.number in adjusted:
            row["tied_with_best"] = "yes" if adjusted[t.number] >= TIE_ALPHA else "no"
        else:
            row["tied_with_best"] = "n/a"
    worst = -np.inf if maximize else np.inf
    ranked = sorted(complete, key=lambda t: t.value if t.value is not None else worst, reverse=maximize)
    if best_run is not None and best_val is not None:
        noise.tied = [best.number] + [
            t.number for t in ranked if noise.columns[t.number]["tied_with_best"] == "yes"
        ]
    noise.summary = _summary(noise, ranked, best, len(tested))
    return noise


def _summary(noise: Noise, ranked: list[FrozenTrial], best: FrozenTrial, tested: int) -> str:
    if not tested:
        return (
            f"best trial {best.number}: no other trial could be tested against it on the same validation "
            "images (runs without stored predictions, or other splits)"
        )
    how = (
        f"McNemar's exact test on the validation predictions vs trial {best.number}, Holm-adjusted, "
        f"alpha {TIE_ALPHA}"
    )
    tied = noise.tied
    if len(tied) == 1:
        return f"trial {best.number} is better than each of the {tested} other trials tested ({how})"
    order = [t.number for t in ranked]
    top = set(order[: len(tied)]) == set(tied)
    head = f"the top {len(tied)} trials are a tie" if top else f"{len(tied)} trials are a tie"
    return (
        f"{head}: trials {', '.join(map(str, tied))} are statistically indistinguishable from the best "
        f"(trial {best.number}) on the validation images ({how})"
    )


def _noise_text(noise: Noise, path: Path) -> Path:
    lines = [noise.summary, "", "trial  tied  p vs best (Holm)  val accuracy [95% interval]"]
    for number, row in sorted(noise.columns.items(), key=lambda kv: kv[0]):
        low, high = (row.get(k, math.nan) for k in _names("final_val_accuracy"))
        lines.append(
            f"{number:>5}  {row.get('tied_with_best', ''):>4}  {row.get('p_vs_best_holm', math.nan):>16.4g}  "
            f"{row.get('final_val_accuracy', math.nan):.4f} [{low:.4f}, {high:.4f}]"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def _names(metric: str) -> tuple[str, str]:
    from bloodcell.evaluation.stats import interval_names

    return interval_names(metric)


def _record_noise(parent_run_id: str, noise: Noise) -> None:
    """The best trial's intervals and the ties, on the sweep's parent run."""
    from bloodcell.tracking import record_to

    metrics = {f"best_trial_{k}": float(v) for k, v in noise.best_metrics.items()}
    metrics["n_tied_with_best"] = float(len(noise.tied))
    tags = {"tied_with_best": " ".join(map(str, noise.tied)), "noise_summary": noise.summary}
    record_to(parent_run_id, tags=tags, metrics=metrics)


def _trials_table(study: Study, path: Path, noise: Noise | None = None) -> Path:
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
    if noise is not None and len(frame):
        keys = sorted({k for row in noise.columns.values() for k in row}, key=_column_order)
        for key in keys:
            frame[key] = [noise.columns.get(int(n), {}).get(key, math.nan) for n in frame["number"]]
    frame.to_csv(path, index=False)
    return path


def _column_order(key: str) -> tuple[int, str]:
    """Interval metrics in INTERVAL_METRICS order (each value, low, high), then the tie columns."""
    for i, name in enumerate(INTERVAL_METRICS):
        if key.startswith(name):
            return (i, key.replace("_ci_low", "~1").replace("_ci_high", "~2"))
    return (len(INTERVAL_METRICS), key)


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
