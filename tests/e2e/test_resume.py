"""Nothing lost when a run dies: per-epoch checkpoints, and `trainer.resume` in the same MLflow run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    TINY,
    TINY_HEAD_ONLY,
    TINY_TRACED,
    Started,
    assert_ok,
    assert_user_error,
    mlflow_runs,
    run_module,
    sqlite_store,
)

# long enough that phase 2 has a few epochs to be killed in; patience high so early stopping does not end it
EPOCHS = [
    "trainer.epochs=2",
    "finetune.epochs=4",
    "trainer.early_stopping_patience=10",
    "finetune.early_stopping_patience=10",
]
RUN = [*TINY, *EPOCHS]
METRICS = ("val_accuracy", "val_loss", "train_loss", "train_accuracy", "learning_rate")


def _checkpoint_state(root: Path) -> dict | None:
    import json

    for state in sorted(root.glob("*/epoch-*/state.json")):
        try:
            return json.loads(state.read_text())
        except (OSError, ValueError):
            return None  # renamed away under us: the next poll sees the new one
    return None


def _kill_in_phase2(args: list[str], checkpoints: Path, after_epochs: int = 2) -> None:
    """Start training and SIGKILL it once a checkpoint shows ``after_epochs`` epochs of phase 2."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bloodcell.train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            state = _checkpoint_state(checkpoints)
            if (
                state
                and state["phase"] == "phase2"
                and state["epoch"] - state["phase1_epochs"] + 1 >= after_epochs
            ):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        assert proc.wait(60) == -signal.SIGKILL, "the run ended before it could be killed in phase 2"
    finally:
        if proc.poll() is None:
            proc.kill()


def _steps(client, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def test_sigkill_in_phase2_then_resume_auto_finishes_the_same_run_like_an_uninterrupted_twin(tmp_path):
    from mlflow.tracking import MlflowClient

    killed_store = sqlite_store(tmp_path / "killed" / "mlflow.db")
    twin_store = sqlite_store(tmp_path / "twin" / "mlflow.db")
    run_args = [*TINY_TRACED, *EPOCHS]  # the traced steps users train with: the resume must match them
    # the uninterrupted twin trains beside the killed run and its resume
    with Started("bloodcell.train", *run_args, f"tracking.uri={twin_store}") as twin_run:
        _kill_in_phase2([*run_args, f"tracking.uri={killed_store}"], tmp_path / "killed" / "checkpoints")
        (run,) = mlflow_runs(killed_store, "quickstart")
        assert run.info.status == "RUNNING"  # what SIGKILL leaves; the next command marks it

        resume = [*run_args, f"tracking.uri={killed_store}", "trainer.resume=auto"]
        assert_ok(run_module("bloodcell.train", *resume))
        assert_ok(twin_run.finish())

    (resumed,) = mlflow_runs(killed_store, "quickstart")
    (twin,) = mlflow_runs(twin_store, "quickstart")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed"] == "1" and "error" not in resumed.data.tags
    client = MlflowClient(killed_store)
    twin_client = MlflowClient(twin_store)
    n_epochs = len(_steps(twin_client, twin.info.run_id, "val_accuracy"))
    for metric in METRICS:
        assert _steps(client, resumed.info.run_id, metric) == list(range(n_epochs)), metric
    for name in ("val_accuracy", "test_accuracy", "best_val_accuracy"):
        assert resumed.data.metrics[name] == pytest.approx(twin.data.metrics[name], abs=1e-6), name
    # the curves themselves, epoch by epoch
    for step, (a, b) in enumerate(
        zip(
            client.get_metric_history(resumed.info.run_id, "val_loss"),
            twin_client.get_metric_history(twin.info.run_id, "val_loss"),
        )
    ):
        assert a.value == pytest.approx(b.value, rel=1e-4, abs=1e-5), step
    # the checkpoints of a finished run are gone
    assert not any((tmp_path / "killed" / "checkpoints").glob("*/epoch-*"))


def test_resume_by_id_refuses_a_finished_run_and_an_unknown_id(tiny_runs, tmp_path):
    # the finished run: the session's tiny quickstart run (TINY_HEAD_ONLY, tests/tiny_runs.py), on a copy
    tracking = tiny_runs.copy(tmp_path / "mlruns")
    args = [*TINY_HEAD_ONLY, "tracking.log_model=false", f"tracking.uri={tracking}"]  # only the run's state
    (run,) = mlflow_runs(tracking, "quickstart")
    assert run.info.run_id == tiny_runs.quickstart and run.info.status == "FINISHED"
    assert_user_error(
        run_module("bloodcell.train", *args, f"trainer.resume={run.info.run_id}"), "already FINISHED"
    )
    assert_user_error(run_module("bloodcell.train", *args, "trainer.resume=0123abcd"), "no such run")
    # auto with nothing to resume starts a new run
    assert_ok(run_module("bloodcell.train", *args, "trainer.resume=auto"))
    assert len(mlflow_runs(tracking, "quickstart")) == 2


def test_four_commands_started_at_once_on_a_brand_new_store_all_succeed(tmp_path):
    """Each of them would create and migrate the SQLite store; the file lock lets one do it."""
    import sqlite3

    store = tmp_path / "new" / "mlflow.db"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = [*TINY, "finetune.epochs=0", "tracking.log_model=false", f"tracking.uri=sqlite:///{store}"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bloodcell.train", *args, f"seed={i}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, "\n".join(e[-2000:] for e in errors)
    runs = mlflow_runs(f"sqlite:///{store}", "quickstart")
    assert len(runs) == 4 and {run.info.status for run in runs} == {"FINISHED"}
    with sqlite3.connect(store) as db:  # no half-done migration left behind
        tables = {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
    assert not any(name.startswith("_alembic_tmp") for name in tables)
