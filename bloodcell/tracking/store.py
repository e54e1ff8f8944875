"""Where runs go: the tracking URI (default: SQLite in <project root>/mlruns/mlflow.db, artifacts beside it),
connecting to it (a new SQLite store is created under a file lock), the experiment, links to the MLflow
UI, and the queries a resume needs (runs left unfinished, runs whose process died, logged steps).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bloodcell import PROJECT_ROOT
from bloodcell.core.errors import UserError
from bloodcell.core.redaction import mask_text
from bloodcell.core.settings import TrackingSchema

log = logging.getLogger("bloodcell.tracking")


DEFAULT_DB = PROJECT_ROOT / "mlruns" / "mlflow.db"


def resolve_tracking_uri(tracking_cfg: TrackingSchema | Any) -> str:
    """The store ``tracking.uri`` names (the ``tracking`` settings, or a mapping of them:
    `TrackingSchema.of`): null is the project's SQLite store."""
    uri = TrackingSchema.of(tracking_cfg).uri
    if not uri:
        DEFAULT_DB.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live in an ``artifacts`` folder beside the db file (MLflow's own default,
    ./mlartifacts, would follow the CWD). A server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "artifacts").as_uri()
    return None


def check_reachable(uri: str, timeout: float = 5.0, wait: float = 0.0) -> None:
    """Fail in a second, with one line, when an http(s) tracking server does not answer (MLflow's own
    client would retry for minutes); with ``wait``, ask again every 2 s for that many seconds first (a
    sweep's trial: `server_wait`)."""
    if not uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + wait
    while True:
        try:
            urllib.request.urlopen(_health_request(uri), timeout=timeout).close()
            return
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):  # a proxy that guards /health too: the server is there, it answered
                return
            raise UserError(f"MLflow tracking server {mask_text(uri)} answered /health with {err}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            if time.monotonic() >= deadline:
                raise UserError(
                    f"MLflow tracking server {mask_text(uri)} is unreachable ({reason}); start it "
                    "(mlflow server ...) or drop tracking.uri to use the local SQLite store"
                ) from None
            if wait:
                log.warning("MLflow tracking server %s is unreachable (%s); asking again for up to %.0f s",
                            mask_text(uri), reason, deadline - time.monotonic())  # fmt: skip
                wait = 0.0  # said once
            time.sleep(2)


def _run_request_defaults() -> None:
    """MLflow's defaults retry one request for about 4 minutes; a training run rather keeps its records in
    its outbox and goes on (users can still set these themselves)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


@contextlib.contextmanager
def patient_requests(tracking_settings: TrackingSchema) -> Any:
    """For a sweep's trial (`server_wait`), MLflow's HTTP requests retried for about a minute inside the
    block (6 tries, backoff 1, 2, 4 ... s) instead of the run's 2: the look-ups before a trial's run starts
    (its ended or unfinished runs, their logged steps) meet a tracking server that restarts then, and the
    trial ended FAIL (the chaos soak). Once the run has started, its records wait in its outbox instead."""
    if not server_wait(tracking_settings):
        yield
        return
    _run_request_defaults()
    name = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    previous = os.environ[name]
    os.environ[name] = str(max(int(previous), 6)) if previous.isdigit() else "6"
    try:
        yield
    finally:
        os.environ[name] = previous


def server_wait(tracking_settings: TrackingSchema) -> float:
    """How long a run waits for its tracking server to answer before it gives up: none for a run a user
    started (one error line at once), ``tracking.outage_wait_seconds`` for a sweep's trial (its parent run
    is set), which would otherwise end FAIL for a server restarting at that moment and count as a trial."""
    return tracking_settings.outage_wait_seconds if tracking_settings.parent_run_id else 0.0


def _health_request(uri: str) -> urllib.request.Request:
    """GET <uri>/health. User info in the URL (``http://alice:pw@host``, which MLflow's client sends as
    basic auth) goes in an Authorization header: urllib would take ``alice:pw@host`` for the host name."""
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri.rstrip("/"))
    headers = {}
    if "@" in parts.netloc:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        parts = parts._replace(netloc=hostport)
    return urllib.request.Request(urlunsplit(parts) + "/health", headers=headers)


def connect(tracking_cfg: Any) -> str:
    """Point MLflow at the configured store and return its URI. A new local SQLite store is created (MLflow
    runs its schema migrations) under a file lock, so that any number of commands may start at once on a
    fresh clone: unserialised, two migrations race and can leave the store half-migrated for good."""
    import mlflow
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_cfg)
    check_reachable(uri, wait=server_wait(TrackingSchema.of(tracking_cfg)))
    if uri.startswith(("http://", "https://")):
        _run_request_defaults()
        # MLflow prints "View run ... at: <tracking URI>/..." with the URI's password in it; bloodcell logs
        # the run's link itself, masked
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # a line per retry otherwise
    if uri.startswith("sqlite:///"):
        with FileLock(uri[len("sqlite:///") :] + ".init-lock"):
            MlflowClient(uri).search_experiments(max_results=1)  # creates and migrates the store once
    mlflow.set_tracking_uri(uri)
    return uri


#: MLflow 3's experiment kind: bloodcell's experiments hold model-training runs, not GenAI traces
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


#: The MLflow 3 UI opens an experiment on its GenAI overview unless its "GenAI / Model training" switch
#: (kept per browser) says otherwise: in MLflow 3.17 that switch, not the experiment kind, picks the
#: pages, and this query parameter sets it. Every MLflow link bloodcell prints carries it.
UI_QUERY = "?workflowType=machine_learning"


#: Where `mlflow ui` serves a local store unless told otherwise
DEFAULT_UI = "http://127.0.0.1:5000"


def setup_experiment(tracking_cfg: TrackingSchema | Any) -> str:
    """Point MLflow at the configured store and return the experiment id (created if new), marked as a
    model-training experiment (`EXPERIMENT_KIND`; an older experiment gets the mark on its next run)."""
    import mlflow

    uri = connect(tracking_cfg)
    name = TrackingSchema.of(tracking_cfg).experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if any(experiment.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):
            with contextlib.suppress(Exception):  # a server may refuse; the runs matter more than the mark
                for key, value in EXPERIMENT_KIND.items():
                    mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location(uri), tags=EXPERIMENT_KIND)
    except Exception:  # another process created it meanwhile (parallel trials)
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def ui_url(experiment_id: str, run_id: str | None = None, tracking_uri: str | None = None) -> str:
    """The MLflow UI page of an experiment (its runs) or of one run, on the model-training pages: on the
    tracking server itself, or for a local store where `mlflow ui` serves it by default (`DEFAULT_UI`)."""
    from urllib.parse import urlsplit

    uri = tracking_uri or ""
    if not uri:
        import mlflow

        uri = mlflow.get_tracking_uri()
    base = DEFAULT_UI
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)  # without user:password@
        base = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base.rstrip('/')}/{page}{UI_QUERY}"


def _process_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def mark_dead_runs(experiment_id: str) -> list[str]:
    """Runs of this host left RUNNING by a process that is gone (SIGKILL, the OOM killer, a crash of the
    interpreter) end KILLED with the reason, instead of staying RUNNING forever. Returns their ids."""
    import socket

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    host = socket.gethostname()
    dead = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid = tags.get("bloodcell.pid", "")
        if tags.get("bloodcell.host") != host or not pid.isdigit() or _process_alive(int(pid)):
            continue
        client.set_tag(
            run.info.run_id,
            "error",
            f"its process (pid {pid} on {host}) died without ending the "
            "run (killed with SIGKILL, out of memory, or the machine was lost); continue it with "
            f"trainer.resume={run.info.run_id}",
        )
        client.set_terminated(run.info.run_id, "KILLED")
        dead.append(run.info.run_id)
    return dead


def unfinished_runs(experiment_id: str, tags: dict[str, str], include_running: bool = False) -> list[str]:
    """Ids of the runs with these tags that did not finish (KILLED, FAILED, and RUNNING ones if asked:
    a sweep trial runs in one process at a time, so its RUNNING run belongs to a job that is gone, on
    whatever host), newest first."""
    from mlflow.tracking import MlflowClient

    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    query += " and attributes.status != 'FINISHED'"
    if not include_running:
        query += " and attributes.status != 'RUNNING'"
    runs = MlflowClient().search_runs(
        [experiment_id], query, order_by=["attributes.start_time DESC"], max_results=100
    )
    return [run.info.run_id for run in runs]


def ended_trial_run(experiment_id: str, tags: dict[str, str]) -> Any | None:
    """The run with these tags (a sweep trial's: ``optuna_trial_id``, ``optuna_study``) that ended by itself:
    FINISHED, or KILLED by its pruner (tag ``optuna.trial_state=PRUNED``); None when there is none. Runs of
    repeats and folds (tag ``bloodcell.member``) are not the trial's own."""
    from mlflow.tracking import MlflowClient

    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = MlflowClient().search_runs([experiment_id], query, max_results=100)
    for run in runs:
        if "bloodcell.member" in run.data.tags:
            continue
        pruned = run.info.status == "KILLED" and run.data.tags.get("optuna.trial_state") == "PRUNED"
        if run.info.status == "FINISHED" or pruned:
            return run
    return None


def run_status(run_id: str) -> tuple[str | None, dict[str, str]]:
    """(status, tags) of a run, or (None, {}) when the store has no such run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return None, {}
    return run.info.status, dict(run.data.tags)


def delete_run(run_id: str) -> None:
    """Move a run to MLflow's trash (searches no longer find it; `mlflow gc` removes it for good)."""
    from mlflow.tracking import MlflowClient

    MlflowClient().delete_run(run_id)


def logged_steps(run_id: str, metric: str, tracking_settings: TrackingSchema | None = None) -> set[int]:
    """The steps at which a run has recorded ``metric`` (a resumed run fills only the missing ones). With
    the run's ``tracking_settings``, a sweep's trial waits out a restarting server (`patient_requests`): a
    requeued trial asks this as it resumes, often just after the fault that stopped it (the chaos soak)."""
    from mlflow.tracking import MlflowClient

    waiting = patient_requests(tracking_settings) if tracking_settings else contextlib.nullcontext()
    with waiting:
        return {m.step for m in MlflowClient().get_metric_history(run_id, metric)}
