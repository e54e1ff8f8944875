"""What a run could not send to a remote tracking server, kept on local disk until the server is back.

A training run that records to an ``mlflow server`` must not die, freeze for minutes or lose an epoch
because the server restarts or the network blips. Each record (metrics, tags, an artifact file, the
model, the run's end) is one JSON line in ``<run dir>/outbox/pending.jsonl``; artifact files and the
model stay beside it until sent. While the outbox holds anything, new records queue behind it (order is
kept), and sending is retried at most every ``retry_seconds``. ``python -m bloodcell.sync`` (and the next
training run on this machine) sends what a finished process left behind. The run's own process holds a
lock on its outbox (``owner.lock``) while it runs, so that no other command sends a live run's records as
well (sent twice, each sender removing the other's file; the kernel lets go of a killed process's lock).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("bloodcell.tracking")

PENDING = "pending.jsonl"
OWNER_LOCK = "owner.lock"


def unreachable(err: BaseException) -> bool:
    """Whether an error means the server could not be reached or is restarting (then the record waits),
    as opposed to a refusal of the record itself (then it is an error like any other)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    if isinstance(err, MlflowException):
        text = str(err)
        return "failed with exception" in text or any(f"{code}" in text for code in (502, 503, 504))
    return False


def apply(run_id: str, record: dict[str, Any]) -> None:
    """Send one record to the current tracking URI (raises when it cannot)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    kind = record["kind"]
    if kind == "metrics":
        stamp, step = int(record["timestamp"]), int(record.get("step") or 0)
        metrics = [Metric(key, float(value), stamp, step) for key, value in record["metrics"].items()]
        client.log_batch(run_id, metrics=metrics, synchronous=True)
    elif kind == "params":
        params = [Param(k, str(v)[:6000]) for k, v in record["params"].items()]
        client.log_batch(run_id, params=params, synchronous=True)
    elif kind == "tags":
        client.log_batch(
            run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()], synchronous=True
        )
    elif kind == "inputs":  # the run's data splits as MLflow dataset inputs (bloodcell.tracking.datasets)
        from bloodcell.tracking.datasets import to_dataset_inputs

        log_inputs_once_created(client, run_id, to_dataset_inputs(record["inputs"]))
    elif kind == "artifact":
        client.log_artifact(run_id, record["path"], record.get("dir"))
    elif kind == "model":
        _log_model(run_id, Path(record["path"]), Path(record["examples"]))
    elif kind == "end":
        client.set_terminated(run_id, record["status"])
    else:
        raise ValueError(f"unknown outbox record {kind!r}")


def log_inputs_once_created(client: Any, run_id: str, datasets: list[Any], tries: int = 3) -> None:
    """``client.log_inputs``, tried again when another run created the same dataset meanwhile. MLflow's
    store looks an experiment's dataset up and inserts it when missing; two trials that start together on
    the same data both insert it, and the second one failed on the store's unique key (seen with two sweep
    processes on one SQLite store: the trial ended FAIL). On the next try the lookup finds the row."""
    from mlflow.exceptions import MlflowException

    for attempt in range(1, tries + 1):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except MlflowException as err:
            text = str(err)
            # SQLite's and PostgreSQL's words for the same unique-key violation
            duplicate = "UNIQUE constraint failed: datasets" in text or (
                "duplicate key value" in text and "datasets" in text
            )
            if not duplicate or attempt == tries:
                raise
            log.debug("dataset created by another run meanwhile; logging the inputs again")


def _log_model(run_id: str, path: Path, examples: Path) -> None:
    """The saved Keras model as the run's MLflow model (what `bloodcell.tracking.log_model` would log)."""
    import contextlib

    import keras
    import mlflow
    import numpy as np

    active = mlflow.active_run()
    # in another process (sync) the run is reopened for the upload; its end status is a record of its own
    opened = contextlib.nullcontext() if active and active.info.run_id == run_id else mlflow.start_run(run_id)
    with np.load(examples) as data, opened:
        info = log_keras_model(keras.saving.load_model(path, compile=False), data["input"], data["output"])
        mlflow.set_tag("model_uri", info.model_uri)


def log_keras_model(model: Any, example_input: Any, example_output: Any) -> Any:
    """``mlflow.keras.log_model`` of ``model`` as the active run's model named ``model``, its signature from
    the examples and its requirements pinned to this process's TensorFlow and Keras; returns MLflow's
    ModelInfo.

    Pinned rather than inferred: inference imports and inspects every module (seconds). And MLflow checks
    even pinned requirements against the environment, building a map of every installed distribution's
    files first (``importlib.metadata.packages_distributions``: 0.8-1.8 s a run, the largest part of logging
    a small model). The pins are this process's own versions, so that check cannot fail: it is given an
    empty map for the call (versions are then read by package name, as for any package the map lacks) and
    MLflow's lazy map is left unbuilt afterwards, as it was."""
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature
    from mlflow.utils import requirements_utils

    unbuilt = requirements_utils._MODULES_TO_PACKAGES is None
    if unbuilt:
        requirements_utils._MODULES_TO_PACKAGES = {}  # type: ignore[assignment]
    try:
        return mlflow.keras.log_model(
            model,
            name="model",
            signature=infer_signature(example_input, example_output),
            pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
        )
    finally:
        if unbuilt:
            requirements_utils._MODULES_TO_PACKAGES = None


class Outbox:
    """The pending records of one run (see the module docstring)."""

    def __init__(self, run_id: str, directory: Path, retry_seconds: float = 30.0) -> None:
        self.run_id, self.directory, self.retry_seconds = run_id, directory, retry_seconds
        self.retry_after = 0.0
        self.in_outage = False
        self._held: IO[str] | None = None

    def hold(self, wait: bool = True) -> bool:
        """Hold this outbox for this process until `release` (or the process ends); False when another
        live process holds it (``wait=False``): its run is alive and sends its records itself."""
        if self._held is not None:
            return True
        self.directory.mkdir(parents=True, exist_ok=True)
        handle = open(self.directory / OWNER_LOCK, "a")  # noqa: SIM115  (held open until release)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            return False
        self._held = handle
        return True

    def release(self) -> None:
        if self._held is not None:
            fcntl.flock(self._held, fcntl.LOCK_UN)
            self._held.close()
            self._held = None

    @property
    def file(self) -> Path:
        return self.directory / PENDING

    def pending(self) -> list[dict[str, Any]]:
        if not self.file.is_file():
            return []
        return [json.loads(line) for line in self.file.read_text().splitlines() if line.strip()]

    def add(self, record: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.file, "a") as out:
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())

    def stage(self, source: Path) -> Path:
        """A copy of a file that must outlive the process until it is sent."""
        staged = self.directory / "files" / f"{time.time_ns()}-{source.name}"
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, staged)
        return staged

    def send(self, record: dict[str, Any]) -> None:
        """Send now if the server answers and nothing is waiting; otherwise queue it (order is kept)."""
        if not self.file.is_file() or self.flush():
            try:
                apply(self.run_id, record)
                return
            except Exception as err:
                if not unreachable(err):
                    raise
                self._outage(err)
        if record["kind"] == "artifact":  # the caller's file is temporary
            record = {**record, "path": str(self.stage(Path(record["path"])))}
        self.add(record)

    def flush(self, force: bool = False) -> bool:
        """Send what waits, in order; True when nothing is left. Between failed tries it waits
        ``retry_seconds`` (unless ``force``), so an outage costs one short timeout, not one per record."""
        records = self.pending()
        if not records:
            return True
        if not force and time.monotonic() < self.retry_after:
            return False
        sent = 0
        for record in records:
            try:
                apply(self.run_id, record)
            except Exception as err:
                if unreachable(err):
                    self._outage(err)
                    self._rewrite(records[sent:])
                    return False
                log.warning("tracking: dropped a %s record the server refused: %s", record["kind"], err)
            sent += 1
        self.file.unlink()
        shutil.rmtree(self.directory / "files", ignore_errors=True)
        if self.in_outage:
            log.warning(
                "tracking server reachable again: %d waiting records of run %s sent", sent, self.run_id
            )
            self.in_outage = False
        return True

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.file)

    def _outage(self, err: BaseException) -> None:
        self.retry_after = time.monotonic() + self.retry_seconds
        if not self.in_outage:  # one line per outage, not a traceback per epoch
            first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            log.warning(
                "tracking server unreachable (%s); training goes on, records wait in %s", first, self.file
            )
            self.in_outage = True


def waiting_outboxes(root: Path) -> list[Outbox]:
    """The outboxes with records left under a checkpoints root (one folder per run id)."""
    return [Outbox(path.parent.parent.name, path.parent) for path in sorted(root.glob(f"*/outbox/{PENDING}"))]
