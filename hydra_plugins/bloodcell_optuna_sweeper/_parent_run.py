"""The sweep's MLflow parent run: kept as a study user attribute (``PARENT_RUN_ATTR``), so that a resumed
or parallel sweep of the study logs to the same run; trials nest under it from train's
``tracking.parent_run_id``. Each trial's child run is linked from the trial (and marked FAILED when the
trial failed or was interrupted); at the end the parent run gets the counts, the best trial and the
report's files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import optuna
from optuna.trial import FrozenTrial, TrialState

from bloodcell import __version__
from bloodcell.sweep.trial import redact, with_storage_retries
from bloodcell.tracking import git_tags, record_to, version_tags

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"


@dataclass
class ParentRun:
    """Where the sweep's parent run is: its tracking client, run id and experiment id."""

    client: MlflowClient
    run_id: str
    experiment_id: str


def summary_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    counts = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "interrupted": 0, "waiting": 0}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            counts["complete"] += 1
        elif t.state == TrialState.PRUNED:
            counts["pruned"] += 1
        elif t.state == TrialState.RUNNING:
            counts["running"] += 1
        elif t.state == TrialState.WAITING:  # queued, not run: given back, or asked beyond n_trials
            counts["waiting"] += 1
        elif t.state == TrialState.FAIL:
            counts["interrupted" if "interrupted" in t.user_attrs else "failed"] += 1
    return counts


def phase1_savings(trials: list[FrozenTrial]) -> dict[str, float]:
    """How many trials started phase 2 from a stored phase 1 (`bloodcell.training.phase1_cache`; their user
    attributes, set by the trial), and the epochs and seconds of phase 1 they did not train."""
    reused = [t for t in trials if "phase1_reused_epochs" in t.user_attrs]
    return {
        "n_phase1_reused": len(reused),
        "phase1_saved_epochs": sum(int(t.user_attrs["phase1_reused_epochs"]) for t in reused),
        "phase1_saved_seconds": sum(float(t.user_attrs.get("phase1_saved_seconds", 0.0)) for t in reused),
    }


def open_parent_run(sweep: Any) -> ParentRun:
    """The parent run of the sweep's (``_impl.OptunaSweep``'s) study, RUNNING again, or a new one (the
    study's first sweep, or its run is gone or in another tracking store)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from bloodcell.tracking import setup_experiment

    experiment_id = setup_experiment(sweep.config.tracking)
    client = MlflowClient(mlflow.get_tracking_uri())
    run_id = sweep.study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id:
        try:
            run = client.get_run(run_id)
            if run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active":
                client.update_run(run_id, status="RUNNING")
                log.info("MLflow: logging to the parent run %s of study '%s'", run_id, sweep.study_name)
                parent = ParentRun(client, run_id, experiment_id)
                _set_tags(parent, sweep)
                return parent
        except Exception as err:  # gone, or another tracking store: start a new parent run
            log.info(
                "MLflow: parent run %s of the study is not usable here (%s); starting a new one", run_id, err
            )
    run = client.create_run(
        experiment_id,
        run_name=f"sweep-{sweep.study_name}",
        tags={"bloodcell.sweep": "true", "optuna.study_name": sweep.study_name},
    )
    params = {
        "study_name": sweep.study_name,
        "direction": sweep.options.direction,
        "sampler": sweep.sampler_name,
        "pruner": sweep.pruner_spec["name"],
        "storage": redact(sweep.storage_url),
        "objective": sweep.objective_name,
        "repeats": int(sweep.options.repeats),
    }
    params.update({f"space.{k}": v for k, v in sweep.space.written.items()})
    record_to(run.info.run_id, params=params)
    run_id = _one_parent(client, experiment_id, sweep.study_name, run.info.run_id)
    sweep.study.set_user_attr(PARENT_RUN_ATTR, run_id)
    log.info("MLflow: parent run %s (experiment %s)", run_id, sweep.config.tracking.experiment)
    parent = ParentRun(client, run_id, experiment_id)
    _set_tags(parent, sweep)
    return parent


def _one_parent(client: MlflowClient, experiment_id: str, study_name: str, mine: str) -> str:
    """Sweeps of one study that start at the same moment on a database storage (no file lock between
    machines) may each create a parent run: all of them keep the earliest, and the others' go."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`bloodcell.sweep` = 'true' and tags.`optuna.study_name` = '{study_name}'",
        max_results=1000,
    )
    earliest = min(runs, key=lambda r: (r.info.start_time, r.info.run_id), default=None)
    if earliest is None or earliest.info.run_id == mine:
        return mine
    client.delete_run(mine)
    return earliest.info.run_id


def _set_tags(parent: ParentRun, sweep: Any) -> None:
    opts = sweep.options
    tags = {
        "n_trials": sweep.n_trials,
        "n_jobs": opts.n_jobs,
        "sampler.config": json.dumps(
            {
                "name": sweep.sampler_name,
                "seed": opts.sampler.seed,
                **(getattr(opts.sampler, sweep.sampler_name, None) or {}),
            },
            sort_keys=True,
        ),
        "pruner.config": json.dumps(sweep.pruner_spec, sort_keys=True),
        "search_space": " ".join(f"{k}={v}" for k, v in sweep.space.written.items()),
        "fixed_overrides": " ".join(sweep.rerun_prefix),
        # what the sweep ran with, as its trials record it: re-running a study needs its environment
        "bloodcell_version": __version__,
        **git_tags(),
        **version_tags(),
    }
    record_to(parent.run_id, tags=tags)


def children(parent: ParentRun, number: int | None = None) -> list:
    """The trials' runs under the parent run (of trial ``number`` only, when given)."""
    query = f"tags.mlflow.parentRunId = '{parent.run_id}'"
    if number is not None:
        query += f" and tags.trial_number = '{number}'"
    return parent.client.search_runs([parent.experiment_id], filter_string=query, max_results=5000)


def link(parent: ParentRun, trial: optuna.trial.Trial | int, trial_id: int, storage: Any = None) -> None:
    """The trial's MLflow run as its user attributes ``mlflow_run_id`` and ``mlflow_run_url`` (shown by
    optuna-dashboard): from a trial to its run; the run's tags ``optuna_study`` and ``trial_number``
    lead back. A trial that failed before its run started has none. ``trial``: the Trial, or its number
    with the ``storage`` that writes its attributes (a trial of another process, given up)."""
    from bloodcell.tracking import ui_url

    number = trial if isinstance(trial, int) else trial.number

    def set_attr(key: str, value: str) -> None:  # through a database outage (bloodcell.sweep.trial)
        if isinstance(trial, int):
            with_storage_retries(lambda: storage.set_trial_user_attr(trial_id, key, value))
        else:
            with_storage_retries(lambda: trial.set_user_attr(key, value))

    try:
        runs = children(parent, number)
        # a study's trial numbers are unique; the storage id tells apart trials of another study
        # that logged under this parent run (a study renamed between sweeps)
        same = [r for r in runs if r.data.tags.get("optuna_trial_id") == str(trial_id)] or runs
        if same:
            run = same[0].info
            set_attr("mlflow_run_id", run.run_id)
            set_attr("mlflow_run_url", ui_url(run.experiment_id, run.run_id))
    except Exception as err:  # a missing link must not stop the sweep
        log.warning("MLflow: could not link trial %d to its run: %s", number, err)


def fail_child(
    parent: ParentRun,
    number: int,
    reason: str,
    only_if_missing: bool = False,
    create: bool = True,
    trial_id: int | None = None,
) -> None:
    """Mark trial ``number``'s child run FAILED (a killed sweep left it RUNNING); with ``create``, make one
    when the trial ended before train started its run, so that every trial has its child run (not for a
    trial going back into the queue: its job makes its run when it starts again, and a second one would
    give the trial two). ``trial_id``: the Optuna storage id, tagged on a run made here."""
    try:
        runs = children(parent, number)
        if not runs:
            if not create:
                return
            tags = {"mlflow.parentRunId": parent.run_id, "trial_number": str(number)}
            if trial_id is not None:
                tags["optuna_trial_id"] = str(trial_id)
            run = parent.client.create_run(parent.experiment_id, run_name=f"trial-{number}", tags=tags)
            runs = [run]
        elif only_if_missing:
            return
        for run in runs:
            if run.info.status in ("RUNNING", "SCHEDULED") or run.info.run_id == runs[0].info.run_id:
                ended = run.info.status in ("RUNNING", "SCHEDULED")
                tags = {"optuna.trial_state": "FAIL", "error": reason}
                record_to(run.info.run_id, tags=tags, status="FAILED" if ended else None)
    except Exception as err:
        log.warning("MLflow: could not mark trial %d's run failed: %s", number, err)


def finish(
    parent: ParentRun, trials: list[FrozenTrial], best: FrozenTrial | None, files: list[Path], status: str
) -> None:
    """The counts, the best trial (value, number, parameters) and the report's files, and the run ends."""
    counts = summary_counts(trials)
    metrics: dict[str, float] = {f"n_{k}": v for k, v in counts.items()} | phase1_savings(trials)
    tags: dict[str, str] = {}
    if best is not None:
        metrics["best_value"] = cast(float, best.value)  # the best trial is a complete one
        metrics["best_trial_number"] = best.number
        tags["best_trial_number"] = str(best.number)
        for key, value in best.params.items():
            tags[f"best.{key}"] = str(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"best.{key}"] = float(value)
    artifacts = [(path, "plots" if path.suffix == ".png" else None) for path in files]
    record_to(parent.run_id, tags=tags, metrics=metrics, step=len(trials), artifacts=artifacts, status=status)
