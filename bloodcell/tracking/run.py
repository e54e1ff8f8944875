"""A run's life in MLflow: `start_run` opens (or reopens, to resume) the run, tags it with the code, package
versions and process, yields its `Recorder`, and ends it FINISHED, FAILED with the reason, or KILLED
(pruned, interrupted); records still waiting for an unreachable server are flushed or left for
`python -m bloodcell.sync`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bloodcell.tracking.outbox as outbox
from bloodcell import PROJECT_ROOT, __version__
from bloodcell.core.errors import is_prune
from bloodcell.core.redaction import mask_secrets, mask_text
from bloodcell.core.settings import TrackingSchema, TrialSchema
from bloodcell.tracking.outbox import Outbox
from bloodcell.tracking.recorder import Recorder
from bloodcell.tracking.store import patient_requests, setup_experiment, ui_url

log = logging.getLogger("bloodcell.tracking")


def git_tags() -> dict[str, str]:
    """Commit of the project checkout and whether it had uncommitted changes; 'unknown' outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))),
        }
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


#: packages whose installed versions every run records as tags ``<name>_version`` (``keras_cv_version``):
#: what re-running an experiment in the environment it was tracked with needs (constraints.txt pins them)
TRACKED_PACKAGES = ("tensorflow", "keras", "keras-cv", "numpy", "mlflow", "optuna", "hydra-core")


def version_tags() -> dict[str, str]:
    """Python's and the key packages' installed versions ('not installed' for a missing one)."""
    import platform
    from importlib import metadata

    tags = {"python_version": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        tags[f"{name.replace('-', '_')}_version"] = version
    return tags


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay whole (one param), as users override them whole."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@contextlib.contextmanager
def start_run(
    cfg: Any,
    *,
    tags: dict[str, str],
    experiment_id: str | None = None,
    resume_run_id: str | None = None,
    local_root: Path,
    tracking_settings: TrackingSchema | None = None,
    trial: TrialSchema | None = None,
) -> Iterator[Recorder]:
    """An MLflow run for one training run (nested under ``tracking.parent_run_id`` inside a sweep), or the
    run ``resume_run_id`` reopened to continue it (its params and config are already recorded). With a
    remote server, records that cannot reach it wait in ``<local_root>/<run id>/outbox``.

    ``cfg`` is the whole config, as the run's params; what the run is told by it comes from its settings,
    ``tracking_settings`` and ``trial`` (the sweep's trial, None outside a sweep). A command that has no
    settings of its own (an ensemble) leaves them out: then they are read from ``cfg`` (`TrackingSchema.of`).

    On an exception the run ends FAILED with the error as tag ``error``; an Optuna prune ends it KILLED
    with ``optuna.trial_state=PRUNED``, keeping the metrics logged so far. The run carries this process's
    host and pid, so that a later command can tell a run whose process died (`mark_dead_runs`).
    """
    import mlflow

    if tracking_settings is None:
        tracking_settings = TrackingSchema.of(cfg.tracking)
        trial = TrialSchema.of(cfg.trial) if "trial" in cfg else None
    experiment_id = experiment_id or setup_experiment(tracking_settings)
    # a sweep's trial waits out a restarting server while its run starts (the chaos soak); a user's run
    # does not wait (`patient_requests`)
    with patient_requests(tracking_settings):
        run = _open_run(
            experiment_id, resume_run_id, tracking_settings, run_tags(tags, tracking_settings, trial)
        )
    run_id = run.info.run_id
    log.info("MLflow run %s: %s", run_id, ui_url(run.info.experiment_id, run_id))
    remote = mlflow.get_tracking_uri().startswith(("http://", "https://"))
    box = Outbox(run_id, local_root / run_id / "outbox") if remote else None
    if box is not None:
        box.hold()  # this run's records are sent by this process alone (outbox module docstring)
    recorder = Recorder(run, box)
    try:
        if not resume_run_id:
            with patient_requests(tracking_settings):
                _log_params(cfg)
        yield recorder
    except BaseException as err:
        status, end_tags = _failed(err, in_sweep=trial is not None)
        _end_run(recorder, status, end_tags, tracking_settings.outage_wait_seconds)
        raise
    else:
        end_tags = {"optuna.trial_state": "COMPLETE"} if trial is not None else {}
        _end_run(recorder, "FINISHED", end_tags, tracking_settings.outage_wait_seconds)
    finally:
        if box is not None:
            box.release()


def run_tags(
    tags: dict[str, str], tracking_settings: TrackingSchema, trial: TrialSchema | None
) -> dict[str, str]:
    """The caller's tags with what every run carries: bloodcell's version, the git commit, the package
    versions, the sweep's trial (number, id, study), ``tracking.tags`` (a repeated or cross-validated
    trial names its members so) and this process (host, pid)."""
    if trial is not None:
        tags = {
            **tags,
            "trial_number": str(trial.number),
            "optuna_trial_id": str(trial.trial_id),
            "optuna_study": str(trial.study_name),
        }
    tags = {**tags, **{str(k): str(v) for k, v in (tracking_settings.tags or {}).items()}}
    return {"bloodcell_version": __version__, **git_tags(), **version_tags(), **tags, **process_tags()}


def _open_run(
    experiment_id: str, resume_run_id: str | None, tracking_settings: TrackingSchema, tags: dict[str, str]
) -> Any:
    """A new MLflow run (nested under ``tracking.parent_run_id`` inside a sweep), or ``resume_run_id``
    reopened: its tags refreshed, its last error dropped (why it stopped is history now) and a count of
    resumes."""
    import mlflow

    parent = tracking_settings.parent_run_id
    if resume_run_id:
        with system_metrics(tracking_settings) as system:
            run = mlflow.start_run(run_id=resume_run_id, nested=bool(parent), log_system_metrics=system)
        mlflow.set_tags(tags)
        resumes = int(run.data.tags.get("resumed", "0")) + 1
        with contextlib.suppress(Exception):
            mlflow.MlflowClient().delete_tag(resume_run_id, "error")
        mlflow.set_tag("resumed", str(resumes))
        return run
    token = uuid.uuid4().hex
    with system_metrics(tracking_settings) as system:
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=tracking_settings.run_name,
            parent_run_id=parent,
            nested=bool(parent),
            tags={**tags, START_TOKEN_TAG: token},
            log_system_metrics=system,
        )
    drop_duplicate_starts(run.info.experiment_id, run.info.run_id, token)
    return run


def _log_params(cfg: Any) -> None:
    """The whole resolved config as params (``a.b`` keys), passwords masked. `trial` (set by the sweeper)
    is the link to Optuna's storage, whose URL may hold a password: the trial number is a tag instead."""
    import mlflow
    from omegaconf import OmegaConf

    plain = mask_secrets(OmegaConf.to_container(cfg, resolve=True))
    assert isinstance(plain, dict)
    params = flatten({k: v for k, v in plain.items() if k != "trial"})
    mlflow.log_params({k: ("null" if v is None else str(v)[:6000]) for k, v in params.items()})


def _failed(err: BaseException, in_sweep: bool) -> tuple[str, dict[str, str]]:
    """How a run that raised ``err`` ends: an Optuna prune KILLED with ``optuna.trial_state=PRUNED`` (the
    metrics logged so far stay), Ctrl-C or SIGTERM KILLED as interrupted, anything else FAILED with the
    error (passwords masked) as tag ``error``."""
    if is_prune(err):
        return "KILLED", {"optuna.trial_state": "PRUNED", "pruned": "true", "pruned_reason": str(err)[:5000]}
    if isinstance(err, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, or SIGTERM (see bloodcell.core.cli)
        return "KILLED", {"error": f"interrupted ({type(err).__name__})"}
    tags = {"error": mask_text(f"{type(err).__name__}: {err}")[:5000]}
    if in_sweep:
        tags["optuna.trial_state"] = "FAIL"
    return "FAILED", tags


#: A random token per run start: a busy server can create a run and answer too late, and the client's retry
#: (MLFLOW_HTTP_REQUEST_MAX_RETRIES) then creates it again; the token finds such copies
START_TOKEN_TAG = "bloodcell.start_token"


def drop_duplicate_starts(experiment_id: str, run_id: str, token: str) -> list[str]:
    """Delete the runs a retried create-run request left beside ``run_id`` (same start token): empty,
    forever RUNNING copies of one run, which would show a trial two or three times. Only a server retries;
    best effort (the run itself is fine either way). Returns the deleted run ids."""
    import mlflow

    if not mlflow.get_tracking_uri().startswith(("http://", "https://")):
        return []
    client = mlflow.MlflowClient()
    deleted = []
    try:
        copies = client.search_runs([experiment_id], filter_string=f"tags.`{START_TOKEN_TAG}` = '{token}'")
        for copy in copies:
            if copy.info.run_id != run_id:
                client.delete_run(copy.info.run_id)
                deleted.append(copy.info.run_id)
    except Exception as err:  # an outage now is the outbox's business, not this clean-up's
        log.debug("could not look for copies of run %s: %s", run_id, err)
    if deleted:
        log.warning(
            "the tracking server created run %s %d times (a slow answer, then the client's retry): "
            "deleted the empty copies %s",
            run_id,
            len(deleted) + 1,
            ", ".join(deleted),
        )
    return deleted


@contextlib.contextmanager
def system_metrics(tracking_cfg: TrackingSchema | Any) -> Iterator[bool]:
    """Whether the run started inside the block records MLflow's system metrics (CPU, memory, disk,
    network, and GPU with ``nvidia-ml-py``), sampled every ``tracking.system_metrics_seconds`` (null or 0:
    off; the ``tracking`` settings, or a mapping of them: `TrackingSchema.of`). An
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL set by the user wins.

    MLflow takes the interval only from that environment variable, which its monitor reads once, as the
    run starts; so it is set for the block and put back after. Left set, it passed for the user's own
    setting: the next run of the same process (a notebook, the API) and every command started from it
    kept the first run's interval, whatever their config said."""
    seconds = TrackingSchema.of(tracking_cfg).system_metrics_seconds
    name = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"
    if not seconds or name in os.environ:
        yield bool(seconds)
        return
    os.environ[name] = str(float(seconds))
    try:
        yield True
    finally:
        os.environ.pop(name, None)


def _end_run(recorder: Recorder, status: str, tags: dict[str, str], outage_wait: float) -> None:
    """The run's last tags and its end status. With a remote server, records still waiting get up to
    ``outage_wait`` seconds to go through; what is left then waits on disk for `python -m bloodcell.sync`."""
    import mlflow

    run_id, box = recorder.run_id, recorder.outbox
    if box is None:
        with contextlib.suppress(Exception):  # the run must still end when a tag cannot be written
            recorder.set_tags(tags)
        mlflow.end_run(status)
        return
    recorder.set_tags(tags)
    deadline = time.monotonic() + outage_wait
    while not box.flush(force=True) and time.monotonic() < deadline:
        time.sleep(min(5.0, max(deadline - time.monotonic(), 0.0)))
    try:
        mlflow.end_run(status)  # leaves the active run first, then tells the server
    except Exception as err:
        if not outbox.unreachable(err):
            raise
        box.add({"kind": "end", "status": status})
    waiting = len(box.pending())
    if waiting:
        log.warning(
            "run %s: the tracking server stayed unreachable; its %d last records (metrics, model, end "
            "status %s) wait in %s: send them with python -m bloodcell.sync tracking.uri=%s",
            run_id,
            waiting,
            status,
            box.directory,
            mask_text(mlflow.get_tracking_uri()),
        )


def send_waiting(root: Path) -> list[tuple[str, int]]:
    """Send the records that runs under a checkpoints root left for an unreachable server; returns
    (run id, records still waiting) per run that had some."""
    results = []
    for box in outbox.waiting_outboxes(root):
        if not box.hold(wait=False):
            continue  # its run is alive in another process, which sends its records itself
        try:
            box.flush(force=True)
            left = len(box.pending())
            if not left and not any((root / box.run_id).glob("epoch-*")):
                import shutil

                shutil.rmtree(root / box.run_id, ignore_errors=True)  # all sent, no checkpoint to resume from
        finally:
            box.release()
        results.append((box.run_id, left))
    return results


def has_waiting(root: Path) -> bool:
    """Whether any run under a checkpoints root left records for `send_waiting`."""
    return bool(outbox.waiting_outboxes(root))


def outbox_waiting(run_dir: Path) -> bool:
    """Whether a run still has records waiting for the server (its folder must not be deleted yet)."""
    return (run_dir / "outbox" / outbox.PENDING).is_file()


def process_tags() -> dict[str, str]:
    import os
    import socket

    return {"bloodcell.host": socket.gethostname(), "bloodcell.pid": str(os.getpid())}
