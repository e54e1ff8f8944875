"""A tracking server that goes away does not kill training (issue 14): records wait in the run's outbox
on local disk and reach the same run when the server is back, or through `python -m bloodcell.sync`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import (
    REPO,
    TINY_TRACED,
    assert_ok,
    free_port,
    run_module,
    start_mlflow_server,
    stop_mlflow_server,
)

# long enough to outlive a 30-second outage; early stopping never ends it. Traced steps: at 40 epochs
# tracing is paid back (eager took 166 s)
RUN = [*TINY_TRACED, "trainer.epochs=40", "finetune.epochs=0", "trainer.early_stopping_patience=100"]


def _train(uri: str, checkpoints: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = [*RUN, f"tracking.uri={uri}", f"trainer.checkpoint.dir={checkpoints}", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "bloodcell.train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_epoch(checkpoints: Path, epoch: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        for state in checkpoints.glob("*/epoch-*/state.json"):
            try:
                if json.loads(state.read_text())["epoch"] >= epoch:
                    return
            except (OSError, ValueError):
                pass
        time.sleep(0.05)
    raise AssertionError("training ended or stalled before the outage could start")


def _the_run(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    return client, run


def _assert_complete(uri: str, n_epochs: int) -> None:
    client, run = _the_run(uri)
    assert run.info.status == "FINISHED"
    for metric in ("val_accuracy", "train_loss", "learning_rate"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
        assert steps == list(range(n_epochs)), metric
    assert "test_accuracy" in run.data.metrics and run.data.tags["model_uri"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "plots"}
    import mlflow

    import bloodcell.evaluation.calibration  # noqa: F401  (registers the temperature layer the calibrated model ends with)

    mlflow.set_tracking_uri(uri)
    model = mlflow.keras.load_model(run.data.tags["model_uri"])
    assert model.output_shape == (None, 8)


def test_server_down_for_30_seconds_mid_run_the_run_finishes_with_every_epoch_and_the_model(tmp_path):
    port, store, checkpoints = free_port(), tmp_path / "server", tmp_path / "checkpoints"
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(store, port)
    proc = _train(uri, checkpoints)
    try:
        _wait_for_epoch(checkpoints, 1, proc)
        stop_mlflow_server(server)
        time.sleep(30)
        server = start_mlflow_server(store, port)
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
    finally:
        proc.kill()
    output = stdout + stderr  # Hydra's log lines go to stdout
    try:
        assert "Traceback" not in output
        assert output.count("tracking server unreachable") == 1, output[-3000:]
        assert "tracking server reachable again" in output
        _assert_complete(uri, 40)
        assert not list(checkpoints.glob("*/outbox/pending.jsonl"))  # all sent
    finally:
        stop_mlflow_server(server)


def test_server_never_back_everything_stays_on_disk_and_sync_sends_it_later(tmp_path):
    port, store, checkpoints = free_port(), tmp_path / "server", tmp_path / "checkpoints"
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(store, port)
    proc = _train(uri, checkpoints, "trainer.epochs=6", "tracking.outage_wait_seconds=2")
    try:
        _wait_for_epoch(checkpoints, 1, proc)
        stop_mlflow_server(server)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    output = stdout + stderr
    assert proc.returncode == 0, output[-3000:]  # training itself succeeded
    assert "Traceback" not in output and "bloodcell.sync" in output
    (pending,) = checkpoints.glob("*/outbox/pending.jsonl")
    assert (pending.parent.parent / "model.keras").is_file()  # the model, loadable, on local disk

    server = start_mlflow_server(store, port)
    try:
        assert_ok(run_module("bloodcell.sync", f"tracking.uri={uri}", f"checkpoint_dir={checkpoints}"))
        _assert_complete(uri, 6)
        assert not pending.exists()
    finally:
        stop_mlflow_server(server)
