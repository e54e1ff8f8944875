"""The MLflow side of a run (config group ``tracking``): where runs go, what each run records.

Default store: SQLite in <project root>/mlruns/mlflow.db with artifacts beside it in mlruns/artifacts
(MLflow 3 refuses a plain folder store). ``tracking.uri`` may name any store or an `mlflow server`.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bloodcell import PROJECT_ROOT, __version__
from bloodcell.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_DB = PROJECT_ROOT / "mlruns" / "mlflow.db"


def resolve_tracking_uri(tracking_cfg) -> str:
    uri = tracking_cfg.get("uri")
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


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in a second, with one line, when an http(s) tracking server does not answer (MLflow's own
    client would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it "
            "(mlflow server ...) or drop tracking.uri to use the local SQLite store"
        ) from None


def setup_experiment(tracking_cfg) -> str:
    """Point MLflow at the configured store and return the experiment id (created if new)."""
    import mlflow

    uri = resolve_tracking_uri(tracking_cfg)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    name = tracking_cfg.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception:  # another process created it meanwhile (parallel trials)
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


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
def start_run(cfg, *, tags: dict[str, str]) -> Iterator[Any]:
    """An MLflow run for one training run (nested under ``tracking.parent_run_id`` inside a sweep).

    On an exception the run ends FAILED with the error as tag ``error``; an Optuna prune ends it KILLED
    with ``optuna.trial_state=PRUNED``, keeping the metrics logged so far.
    """
    import mlflow
    from omegaconf import OmegaConf

    experiment_id = setup_experiment(cfg.tracking)
    parent = cfg.tracking.get("parent_run_id")
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=cfg.tracking.get("run_name"),
        parent_run_id=parent,
        nested=bool(parent),
        tags={"bloodcell_version": __version__, **git_tags(), **tags},
    )
    try:
        # `trial` (set by the sweeper) is the link to Optuna's storage, whose URL may hold a password:
        # the trial number is a tag instead.
        params = flatten({k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "trial"})
        mlflow.log_params({k: ("null" if v is None else str(v)[:6000]) for k, v in params.items()})
        yield run
    except BaseException as err:
        import optuna

        if isinstance(err, optuna.TrialPruned):
            mlflow.set_tags(
                {"optuna.trial_state": "PRUNED", "pruned": "true", "pruned_reason": str(err)[:5000]}
            )
            mlflow.end_run("KILLED")
        elif isinstance(err, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, or SIGTERM (see bloodcell.cli)
            with contextlib.suppress(Exception):
                mlflow.set_tag("error", f"interrupted ({type(err).__name__})")
            mlflow.end_run("KILLED")
        else:
            reason = f"{type(err).__name__}: {err}"[:5000]
            tags = {"error": reason}
            if "trial" in cfg:
                tags["optuna.trial_state"] = "FAIL"
            with contextlib.suppress(Exception):
                mlflow.set_tags(tags)
            mlflow.end_run("FAILED")
        raise
    else:
        if "trial" in cfg:
            mlflow.set_tag("optuna.trial_state", "COMPLETE")
        mlflow.end_run("FINISHED")


def epoch_logger():
    """A Keras callback that logs every epoch's metrics and learning rate to the active MLflow run, on one
    step axis across both phases (Keras' epoch index, continued in phase 2 through ``initial_epoch``)."""
    import keras
    import mlflow

    class MlflowEpochLogger(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.history: list[dict[str, float]] = []

        def on_epoch_end(self, epoch, logs=None):
            metrics = {}
            for key, value in (logs or {}).items():
                name = key if key.startswith("val_") else f"train_{key}"
                metrics[name] = float(value)
            lr = self.model.optimizer.learning_rate
            metrics["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
            self.history.append({"epoch": epoch, **metrics})
            mlflow.log_metrics(metrics, step=epoch)

    return MlflowEpochLogger()
