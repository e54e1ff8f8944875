"""The MLflow side of a run (config group ``tracking``): where runs go (`store`), a run's life (`run`), and
what it records (`recorder`: the object `start_run` yields; records wait in an `outbox` while a server is
unreachable). It records what it is handed and imports no domain module.

Default store: SQLite in <project root>/mlruns/mlflow.db with artifacts beside it in mlruns/artifacts
(MLflow 3 refuses a plain folder store). ``tracking.uri`` may name any store or an `mlflow server`.
"""

from bloodcell.tracking.recorder import Recorder, predictions_path, record_to
from bloodcell.tracking.run import (
    flatten,
    git_tags,
    has_waiting,
    outbox_waiting,
    process_tags,
    send_waiting,
    start_run,
    version_tags,
)
from bloodcell.tracking.store import (
    DEFAULT_DB,
    UI_QUERY,
    artifact_location,
    check_reachable,
    connect,
    delete_run,
    ended_trial_run,
    logged_steps,
    mark_dead_runs,
    patient_requests,
    resolve_tracking_uri,
    run_status,
    server_wait,
    setup_experiment,
    ui_url,
    unfinished_runs,
)

__all__ = [
    "DEFAULT_DB",
    "UI_QUERY",
    "Recorder",
    "artifact_location",
    "check_reachable",
    "connect",
    "delete_run",
    "ended_trial_run",
    "flatten",
    "git_tags",
    "logged_steps",
    "mark_dead_runs",
    "has_waiting",
    "outbox_waiting",
    "patient_requests",
    "predictions_path",
    "process_tags",
    "record_to",
    "resolve_tracking_uri",
    "run_status",
    "send_waiting",
    "server_wait",
    "setup_experiment",
    "start_run",
    "ui_url",
    "unfinished_runs",
    "version_tags",
]
