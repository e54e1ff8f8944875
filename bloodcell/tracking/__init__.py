"""The MLflow side of a run (config group ``tracking``): where runs go, what each run records.

Default store: SQLite in <project root>/mlruns/mlflow.db with artifacts beside it in mlruns/artifacts
(MLflow 3 refuses a plain folder store). ``tracking.uri`` may name any store or an `mlflow server`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bloodcell import PROJECT_ROOT, __version__
from bloodcell.errors import UserError
from bloodcell.redaction import mask_secrets, mask_text
from bloodcell.tracking import outbox
from bloodcell.tracking.outbox import Outbox

log = logging.getLogger(__name__)

DEFAULT_DB = PROJECT_ROOT / "mlruns" / "mlflow.db"


def resolve_tracking_uri(tracking_cfg: Any) -> str:
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
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):  # a proxy that guards /health too: the server is there, it answered
            return
        raise UserError(f"MLflow tracking server {mask_text(uri)} answered /health with {err}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"MLflow tracking server {mask_text(uri)} is unreachable ({reason}); start it "
            "(mlflow server ...) or drop tracking.uri to use the local SQLite store"
        ) from None


def connect(tracking_cfg: Any) -> str:
    """Point MLflow at the configured store and return its URI. A new local SQLite store is created (MLflow
    runs its schema migrations) under a file lock, so that any number of commands may start at once on a
    fresh clone: unserialised, two migrations race and can leave the store half-migrated for good."""
    import mlflow
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_cfg)
    check_reachable(uri)
    if uri.startswith(("http://", "https://")):
        # MLflow's defaults retry one request for about 4 minutes; a training run rather keeps its records
        # in its outbox and goes on (users can still set these themselves)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
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


def setup_experiment(tracking_cfg: Any) -> str:
    """Point MLflow at the configured store and return the experiment id (created if new), marked as a
    model-training experiment (`EXPERIMENT_KIND`; an older experiment gets the mark on its next run)."""
    import mlflow

    uri = connect(tracking_cfg)
    name = tracking_cfg.experiment
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
    local_root: Path | None = None,
) -> Iterator[Any]:
    """An MLflow run for one training run (nested under ``tracking.parent_run_id`` inside a sweep), or the
    run ``resume_run_id`` reopened to continue it (its params and config are already recorded). With a
    remote server, records that cannot reach it wait in ``<local_root>/<run id>/outbox``.

    On an exception the run ends FAILED with the error as tag ``error``; an Optuna prune ends it KILLED
    with ``optuna.trial_state=PRUNED``, keeping the metrics logged so far. The run carries this process's
    host and pid, so that a later command can tell a run whose process died (`mark_dead_runs`).
    """
    import mlflow
    from omegaconf import OmegaConf

    experiment_id = experiment_id or setup_experiment(cfg.tracking)
    parent = cfg.tracking.get("parent_run_id")
    if "trial" in cfg:
        trial = cfg.trial
        tags = {
            **tags,
            "trial_number": str(trial.number),
            "optuna_trial_id": str(trial.trial_id),
            "optuna_study": str(trial.study_name),
        }
    # tracking.tags: set by a run's caller (a repeated or cross-validated trial names its members so)
    tags = {**tags, **{str(k): str(v) for k, v in (cfg.tracking.get("tags") or {}).items()}}
    tags = {"bloodcell_version": __version__, **git_tags(), **version_tags(), **tags, **process_tags()}
    system = system_metrics(cfg.tracking)
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id, nested=bool(parent), log_system_metrics=system)
        mlflow.set_tags(tags)
        # why it stopped is history now; a count says it was resumed
        resumes = int(run.data.tags.get("resumed", "0")) + 1
        with contextlib.suppress(Exception):
            mlflow.MlflowClient().delete_tag(resume_run_id, "error")
        mlflow.set_tag("resumed", str(resumes))
    else:
        token = uuid.uuid4().hex
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=cfg.tracking.get("run_name"),
            parent_run_id=parent,
            nested=bool(parent),
            tags={**tags, START_TOKEN_TAG: token},
            log_system_metrics=system,
        )
        drop_duplicate_starts(run.info.experiment_id, run.info.run_id, token)
    global _run_id, _outbox
    _run_id = run.info.run_id
    log.info("MLflow run %s: %s", _run_id, ui_url(run.info.experiment_id, _run_id))
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        from bloodcell.checkpoints import root_for

        _outbox = Outbox(_run_id, (local_root or root_for(uri)) / _run_id / "outbox")
    try:
        # `trial` (set by the sweeper) is the link to Optuna's storage, whose URL may hold a password:
        # the trial number is a tag instead.
        if not resume_run_id:
            plain = mask_secrets(OmegaConf.to_container(cfg, resolve=True))  # no password in a param
            assert isinstance(plain, dict)
            params = flatten({k: v for k, v in plain.items() if k != "trial"})
            mlflow.log_params({k: ("null" if v is None else str(v)[:6000]) for k, v in params.items()})
        yield run
    except BaseException as err:
        import optuna

        if isinstance(err, optuna.TrialPruned):
            tags = {"optuna.trial_state": "PRUNED", "pruned": "true", "pruned_reason": str(err)[:5000]}
            status = "KILLED"
        elif isinstance(err, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, or SIGTERM (see bloodcell.cli)
            tags, status = {"error": f"interrupted ({type(err).__name__})"}, "KILLED"
        else:
            tags, status = {"error": mask_text(f"{type(err).__name__}: {err}")[:5000]}, "FAILED"
            if "trial" in cfg:
                tags["optuna.trial_state"] = "FAIL"
        _end_run(status, tags, cfg.tracking.get("outage_wait_seconds", 120))
        raise
    else:
        tags = {"optuna.trial_state": "COMPLETE"} if "trial" in cfg else {}
        _end_run("FINISHED", tags, cfg.tracking.get("outage_wait_seconds", 120))


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


def system_metrics(tracking_cfg: Any) -> bool:
    """Whether the run records MLflow's system metrics (CPU, memory, disk, network, and GPU with
    ``nvidia-ml-py``), sampled every ``tracking.system_metrics_seconds`` (null or 0: off). An
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL set by the user wins."""
    seconds = tracking_cfg.get("system_metrics_seconds", 10)
    if not seconds:
        return False
    if "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ:
        import mlflow

        mlflow.set_system_metrics_sampling_interval(float(seconds))
    return True


def _end_run(status: str, tags: dict[str, str], outage_wait: float) -> None:
    """The run's last tags and its end status. With a remote server, records still waiting get up to
    ``outage_wait`` seconds to go through; what is left then waits on disk for `python -m bloodcell.sync`."""
    import mlflow

    global _run_id, _outbox
    run_id, box = _run_id, _outbox
    try:
        if box is None:
            with contextlib.suppress(Exception):  # the run must still end when a tag cannot be written
                set_tags(tags)
            mlflow.end_run(status)
            return
        set_tags(tags)
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
    finally:
        _run_id, _outbox = None, None


def send_waiting(root: Path) -> list[tuple[str, int]]:
    """Send the records that runs under a checkpoints root left for an unreachable server; returns
    (run id, records still waiting) per run that had some."""
    results = []
    for box in outbox.waiting_outboxes(root):
        box.flush(force=True)
        left = len(box.pending())
        if not left and not any((root / box.run_id).glob("epoch-*")):
            import shutil

            shutil.rmtree(root / box.run_id, ignore_errors=True)  # all sent, and no checkpoint to resume from
        results.append((box.run_id, left))
    return results


def outbox_waiting(run_dir: Path) -> bool:
    """Whether a run still has records waiting for the server (its folder must not be deleted yet)."""
    return (run_dir / "outbox" / outbox.PENDING).is_file()


def process_tags() -> dict[str, str]:
    import os
    import socket

    return {"bloodcell.host": socket.gethostname(), "bloodcell.pid": str(os.getpid())}


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


def run_status(run_id: str) -> tuple[str | None, dict[str, str]]:
    """(status, tags) of a run, or (None, {}) when the store has no such run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return None, {}
    return run.info.status, dict(run.data.tags)


def logged_steps(run_id: str, metric: str) -> set[int]:
    """The steps at which a run has recorded ``metric`` (a resumed run fills only the missing ones)."""
    from mlflow.tracking import MlflowClient

    return {m.step for m in MlflowClient().get_metric_history(run_id, metric)}


# ---- what a training run records (the one place to add a metric, a tag or an artifact) --------------------
# Every record goes through `_send`: straight to the store, or, with a remote server, through the run's
# outbox (bloodcell.tracking.outbox), so that an unreachable server delays records instead of losing them.

_run_id: str | None = None
_outbox: Outbox | None = None


def _send(record: dict[str, Any]) -> None:
    assert _run_id is not None, "record only inside tracking.start_run"
    if _outbox is not None:
        _outbox.send(record)
    else:
        outbox.apply(_run_id, record)


def _send_file(artifact_path: str, write: Callable[[Path], Any]) -> None:
    """An artifact at ``artifact_path`` (e.g. ``plots/x.png``) whose file ``write(path)`` makes."""
    import tempfile

    folder, name = os.path.split(artifact_path)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        write(local)
        _send({"kind": "artifact", "path": str(local), "dir": folder or None})


def log_epoch(metrics: dict[str, float], step: int) -> None:
    """One epoch's metrics (``train_*``, ``val_*``, ``learning_rate``) at step = the global epoch.

    The learning curves keep names without a "/" (sweeps, promote, resume and scripts read them), so the
    MLflow UI, which sorts named chart sections first, shows them in its last section, "Model metrics"."""
    _send({"kind": "metrics", "metrics": metrics, "step": step, "timestamp": int(time.time() * 1000)})


def log_metrics(metrics: dict[str, float]) -> None:
    """Run-level figures: test metrics, the best objective, counts."""
    _send({"kind": "metrics", "metrics": metrics, "step": 0, "timestamp": int(time.time() * 1000)})


def set_tags(tags: dict[str, str]) -> None:
    _send({"kind": "tags", "tags": {k: mask_text(str(v)) for k, v in tags.items()}})


def log_text(text: str, artifact_path: str) -> None:
    _send_file(artifact_path, lambda path: path.write_text(text))


def log_dict(data: dict[str, Any], artifact_path: str) -> None:
    import json

    log_text(json.dumps(data, indent=2), artifact_path)


def log_figure(figure: Any, artifact_path: str) -> None:
    import matplotlib.pyplot as plt

    _send_file(artifact_path, lambda path: figure.savefig(path))
    plt.close(figure)


def log_image(image: Any, artifact_path: str) -> None:
    """A uint8 (H, W, 3) array as a PNG."""
    from PIL import Image

    _send_file(artifact_path, lambda path: Image.fromarray(image).save(path))


def log_config(cfg: Any, overrides: list[str]) -> None:
    """The resolved config and the command-line overrides, as ``config.yaml`` and ``overrides.yaml``,
    with passwords in URLs masked (the run's process has the real values)."""
    from omegaconf import OmegaConf

    log_text(OmegaConf.to_yaml(mask_secrets(OmegaConf.to_container(cfg, resolve=True))), "config.yaml")
    log_text(OmegaConf.to_yaml(mask_secrets(list(overrides))), "overrides.yaml")


def log_datasets(data_cfg: Any, arrays: Any, splits: Any) -> None:
    """The train, validation and test splits as the run's MLflow dataset inputs (context ``train`` /
    ``val`` / ``test``): what the UI's Dataset column and the run page show a model was trained on.

    Each is named after the data set (``training_set``, ``demo``, ...) with its source (the file or
    folder, MedMNIST's record, or the code that made demo images); its digest names exactly the split's
    images (the data fingerprint, tag ``data_fingerprint``, and which of its images the split holds), so
    runs on one split share one dataset; the profile gives the image count, the class counts, the image
    shape and the full fingerprint. Logged once, when a run starts (a resumed run has them)."""
    from bloodcell.tracking.datasets import dataset_inputs

    _send({"kind": "inputs", "inputs": dataset_inputs(data_cfg, arrays, splits)})


def log_timings(seconds: dict[str, float]) -> None:
    """Where a run's time went (``seconds_<part>``), as ``time/seconds_<part>``: a section of their own in
    the MLflow UI's charts, beside the per-epoch ``time/train_images_per_second``."""
    log_metrics({f"time/{name}": value for name, value in seconds.items()})


def log_skipped_images(skipped: list[str], source: str) -> None:
    """Image files a folder data set could not read and training left out: metric
    ``data_skipped_images`` and the list as ``data/skipped_images.txt``."""
    log_metrics({"data_skipped_images": len(skipped)})
    if skipped:
        log_text(
            f"# unreadable image files in {source}, left out\n" + "\n".join(skipped) + "\n",
            "data/skipped_images.txt",
        )


def log_cleaning(result: Any, arrays: Any) -> None:
    """Counts as metrics, the JSON report and the contact sheet of removed samples (``data.clean=true``)."""
    from bloodcell.clean import contact_sheet, report_dict

    # under data/: a section of their own in the MLflow UI's charts
    log_metrics({"data/cleaning_removed": result.n_removed,
                 **{f"data/cleaning_removed_{k}": v for k, v in result.counts.items()}})  # fmt: skip
    log_dict(report_dict(result, arrays.labels, arrays.source), "cleaning/report.json")
    if result.n_removed:
        _send_file(
            "cleaning/removed.png", lambda path: contact_sheet(result, arrays.images, arrays.labels, path)
        )


def log_augmentation_preview(grid: Any) -> None:
    """A grid of training images as the augmentation sees them (``plots/augmentation_preview.png``)."""
    log_image(grid, "plots/augmentation_preview.png")


def log_evaluation(evaluation: Any, history: list[dict[str, float]] | None, phase2_start: int | None) -> None:
    """The test evaluation: its metrics, the classification report, the confusion matrix and the
    learning curves of both phases (none for a model that was not trained, ``history=None``: an ensemble)."""
    from bloodcell.evaluate import confusion_figure, curves_figure

    log_metrics(evaluation.metrics)
    log_dict(evaluation.report, "classification_report.json")
    log_figure(confusion_figure(evaluation.confusion), "plots/confusion_matrix.png")
    if history is not None:
        log_figure(curves_figure(history, phase2_start), "plots/training_curves.png")


def log_calibration(metrics: dict[str, float], figure: Any) -> None:
    """Temperature scaling's outcome (``calibration/*`` metrics, bloodcell.calibration) and its
    reliability diagram, ``plots/reliability.png``."""
    log_metrics(metrics)
    log_figure(figure, "plots/reliability.png")


def log_abstention(metrics: dict[str, float], figure: Any) -> None:
    """The accuracy/coverage trade of the test split (``abstention/*`` metrics, bloodcell.abstention) and
    its curve, ``plots/accuracy_coverage.png``."""
    log_metrics(metrics)
    log_figure(figure, "plots/accuracy_coverage.png")


def predictions_path(split: str) -> str:
    """Where a run keeps the final model's predictions on one split (``val`` or ``test``)."""
    return f"predictions/{split}.npz"


def log_predictions(
    split: str, arrays: Any, data_index: Any, probabilities: Any, split_fingerprint: str
) -> None:
    """The final model's class probabilities on one split, per image, as ``predictions/<split>.npz``:
    ``index`` (position in the split), ``data_index`` (position in the data set the split was cut from),
    ``labels``, ``probabilities`` (N, 8) float32, and the ``fingerprint`` / ``split_fingerprint`` they
    belong to. Two runs with the same split fingerprint can be compared image by image later
    (``python -m bloodcell.compare``, the champion gate of ``promote``) without running either again."""
    import numpy as np

    def write(path: Path) -> None:
        n = len(arrays.labels)
        with path.open("wb") as f:  # np.savez_compressed would add ".npz" to a str path without it
            np.savez_compressed(
                f,
                index=np.arange(n, dtype=np.int64),
                data_index=np.asarray(data_index, dtype=np.int64),
                labels=np.asarray(arrays.labels, dtype=np.int64),
                probabilities=np.asarray(probabilities, dtype=np.float32),
                fingerprint=np.array(arrays.fingerprint),
                split_fingerprint=np.array(split_fingerprint),
            )

    _send_file(predictions_path(split), write)


def log_validation(evaluation: Any) -> None:
    """The final model on the validation split: accuracy and macro-F1 with their intervals (per-class
    figures stay in its predictions: the test split is where a run reports those)."""
    log_metrics({k: v for k, v in evaluation.metrics.items() if "precision_" not in k and "recall_" not in k})


def log_explanations(model: Any, images: Any, labels: Any, probabilities: Any) -> None:
    """What the model looked at, on the test split (``tracking.explain``): ``plots/gradcam.png`` (per class
    the most confident correct and wrong image with its Grad-CAM heat map) and ``plots/test_errors.png``
    (the most confident errors, counted in the title). A model Grad-CAM cannot explain gets a warning and
    no Grad-CAM sheet, never a failed run (bloodcell.explain)."""
    from bloodcell.explain import sheets

    for name, figure in sheets(model, images, labels, probabilities).items():
        log_figure(figure, "plots/gradcam.png" if name == "gradcam" else "plots/test_errors.png")


def _remove_partial_model(run_id: str | None) -> None:
    """After a failed upload to a local artifact folder (a full disk), no truncated model file stays under
    its final name: the run's logged-model folders go. (A server's store is the server's business.)"""
    import shutil
    from urllib.parse import unquote, urlparse

    import mlflow

    active = mlflow.active_run()
    with contextlib.suppress(Exception):
        experiments = [active.info.experiment_id] if active else None  # without one nothing is found
        found = mlflow.search_logged_models(
            experiment_ids=experiments, filter_string=f"source_run_id = '{run_id}'", output_format="list"
        )
        for model in found:
            location = urlparse(model.artifact_location)
            if location.scheme in ("", "file"):
                shutil.rmtree(unquote(location.path), ignore_errors=True)


def record_to(
    run_id: str,
    *,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    step: int = 0,
    artifacts: list[tuple[Path, str | None]] = (),  # type: ignore[assignment]
    status: str | None = None,
) -> None:
    """Records for a run that is not the active training run (the sweep's parent run, a trial's child run
    that the sweeper ends): the same record kinds, sent the same way, in that order."""
    stamp = int(time.time() * 1000)
    records: list[dict[str, Any]] = []
    if params:
        records.append({"kind": "params", "params": mask_secrets(params)})
    if tags:
        records.append({"kind": "tags", "tags": {k: mask_text(str(v))[:5000] for k, v in tags.items()}})
    if metrics:
        records.append({"kind": "metrics", "metrics": metrics, "step": step, "timestamp": stamp})
    records += [{"kind": "artifact", "path": str(path), "dir": folder} for path, folder in artifacts]
    if status:
        records.append({"kind": "end", "status": status})
    for record in records:
        outbox.apply(run_id, record)


def log_model(model: Any, example_input: Any, example_output: Any, local_dir: Path) -> str:
    """The Keras model as an MLflow model named ``model`` (registrable), with a signature from the given
    examples; returns its URI, also kept as tag ``model_uri``.

    The model is first saved to ``local_dir/model.keras`` (written under a temporary name, then renamed):
    if the upload fails (a full disk, a server gone), the error names that loadable copy, and the run ends
    FAILED with it. The caller deletes the copy with the run's checkpoints once the run finished."""
    import keras
    import mlflow
    import numpy as np
    import tensorflow as tf
    from mlflow.models import infer_signature

    local_dir.mkdir(parents=True, exist_ok=True)
    local = local_dir / "model.keras"
    partial = local_dir / f"model.tmp-{os.getpid()}.keras"  # Keras wants the extension
    try:
        model.save(partial)
        os.replace(partial, local)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise OSError(f"saving the model locally to {local} failed: {err}") from err
    examples = local_dir / "model_examples.npz"
    np.savez(examples, input=example_input, output=example_output)
    if _outbox is not None:
        _outbox.send({"kind": "model", "path": str(local), "examples": str(examples)})
        return f"runs:/{_run_id}/model"
    try:
        info = mlflow.keras.log_model(
            model,
            name="model",
            signature=infer_signature(example_input, example_output),
            # pinned rather than inferred: inference imports and inspects every module (seconds).
            pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
        )
    except Exception as err:
        _remove_partial_model(_run_id)
        raise RuntimeError(
            f"uploading the model to MLflow failed ({err}); a loadable copy is at {local}"
        ) from err
    mlflow.set_tag("model_uri", info.model_uri)
    return str(info.model_uri)
