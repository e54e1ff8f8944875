"""The MLflow records of a run made of several training runs: a sweep trial trained with several seeds
(``hydra.sweeper.repeats``) or on K cross-validation folds (``data.cv.folds``). The group run holds the
config and the summary (mean, spread, each member's value); each member is an ordinary training run
(`bloodcell.tracking.start_run`), nested under it, tagged with its kind and index so that a resumed trial
finds the members it already finished (`finished_members`) or left behind (`unfinished_members`).

The group run is made with the client, not as the active run: the members are the active runs, one
after another, in the same process.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

from omegaconf import OmegaConf

from bloodcell.core.redaction import mask_secrets
from bloodcell.core.settings import TrackingSchema, TrialSchema
from bloodcell.tracking.recorder import record_to
from bloodcell.tracking.run import flatten, git_tags, process_tags, version_tags

log = logging.getLogger("bloodcell.tracking")

#: tag of a group run: "repeats" or "cv"
GROUP_TAG = "bloodcell.group"
#: tags of a member run: its kind ("repeat" or "fold") and its index (0-based)
KIND_TAG = "bloodcell.member"
INDEX_TAG = "bloodcell.member_index"


def _client() -> Any:  # MlflowClient
    import mlflow
    from mlflow.tracking import MlflowClient

    return MlflowClient(mlflow.get_tracking_uri())


def open_group_run(
    cfg: Any,
    tracking_settings: TrackingSchema,
    trial: TrialSchema | None,
    experiment_id: str,
    group: str,
    tags: dict[str, str],
) -> str:
    """The id of the group run for ``cfg`` (the whole config, as the run's params): in a sweep (``trial``),
    the trial's own group run when a killed job left one (found by the trial's tags, reopened RUNNING),
    else a new run nested under ``tracking.parent_run_id`` with the config as params and ``tags``."""
    client = _client()
    here = process_tags()
    if trial is not None:
        query = " and ".join(
            [
                f"tags.`{GROUP_TAG}` = '{group}'",
                f"tags.optuna_trial_id = '{trial.trial_id}'",
                f"tags.optuna_study = '{trial.study_name}'",
            ]
        )
        found = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"])
        if found:
            run_id = str(found[0].info.run_id)
            client.update_run(run_id, status="RUNNING")
            # why it stopped is history now (the sweeper marks an interrupted trial's run FAILED)
            with contextlib.suppress(Exception):
                client.delete_tag(run_id, "error")
            resumes = int(found[0].data.tags.get("resumed", "0")) + 1
            record_to(run_id, tags={**here, "resumed": str(resumes)})
            log.info("MLflow: continuing the %s run %s of trial %s", group, run_id, trial.number)
            return run_id
    all_tags = {**git_tags(), **version_tags(), **tags, **here, GROUP_TAG: group}
    parent = tracking_settings.parent_run_id
    if parent:
        all_tags["mlflow.parentRunId"] = str(parent)
    run = client.create_run(experiment_id, run_name=tracking_settings.run_name, tags=all_tags)
    plain = mask_secrets(OmegaConf.to_container(cfg, resolve=True))  # no password in a param
    assert isinstance(plain, dict)
    params = flatten({k: v for k, v in plain.items() if k != "trial"})
    record_to(
        run.info.run_id, params={k: ("null" if v is None else str(v)[:6000]) for k, v in params.items()}
    )
    return str(run.info.run_id)


def _members(experiment_id: str, group_run_id: str) -> list[Any]:
    query = f"tags.mlflow.parentRunId = '{group_run_id}'"
    return list(
        _client().search_runs(
            [experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1000
        )
    )


def finished_members(experiment_id: str, group_run_id: str, metric: str) -> dict[int, float]:
    """Member index -> ``metric`` of the group's FINISHED members (the value a resumed trial reuses)."""
    values: dict[int, float] = {}
    for run in _members(experiment_id, group_run_id):
        index = run.data.tags.get(INDEX_TAG)
        if run.info.status == "FINISHED" and index is not None and metric in run.data.metrics:
            values.setdefault(int(index), float(run.data.metrics[metric]))
    return values


def unfinished_members(experiment_id: str, group_run_id: str, index: int) -> list[str]:
    """Ids of member ``index``'s runs that did not finish (a killed job's), newest first."""
    return [
        str(run.info.run_id)
        for run in _members(experiment_id, group_run_id)
        if run.data.tags.get(INDEX_TAG) == str(index) and run.info.status != "FINISHED"
    ]


def member_tags(kind: str, index: int, of: int) -> dict[str, str]:
    return {KIND_TAG: kind, INDEX_TAG: str(index), f"{KIND_TAG}_count": str(of)}


def log_member_summary(
    group_run_id: str, objective: str, values: dict[int, float], kind: str
) -> dict[str, Any]:
    """The members' ``objective`` on the group run: ``<objective>_mean``, ``_std`` (sample standard
    deviation, ddof 1; 0 for one member), ``_min``, ``_max``, and each member's value as the metric
    ``<kind>/<objective>`` at step = its index. Returns the summary (for Optuna's user attributes)."""
    import numpy as np

    ordered = [values[i] for i in sorted(values)]
    array = np.asarray(ordered, dtype=float)
    summary: dict[str, Any] = {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
    }
    metrics = {f"{objective}_{k}": v for k, v in summary.items() if math.isfinite(v)}
    metrics[f"n_{kind}s"] = float(len(ordered))
    record_to(group_run_id, metrics=metrics)
    for index in sorted(values):
        record_to(group_run_id, metrics={f"{kind}/{objective}": values[index]}, step=index)
    summary["values"] = ordered
    return summary


def end_group_run(group_run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    """The group run's last tags and its end status (FINISHED, KILLED, FAILED)."""
    record_to(group_run_id, tags=tags or None, status=status)
