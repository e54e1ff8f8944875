"""The multi-node sweep recipe of docs/sweeps.md, on one machine: an `mlflow server` holds the runs, a shared
Optuna storage holds the study, Hydra's submitit launcher starts every trial as its own job (the same code
path as `hydra/launcher=submitit_slurm`, minus the queue), and two sweep processes work on one study.

The storage is PostgreSQL when BLOODCELL_TEST_POSTGRES names a database the test may write to, e.g.
    BLOODCELL_TEST_POSTGRES=postgresql://bloodcell:bloodcell@localhost/optuna \\
        python -m pytest tests/e2e/test_multi_node.py
(needs `pip install "psycopg[binary]"`); otherwise Optuna's journal file, as on a shared file system.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.helpers import TINY, free_port, start_mlflow_server, stop_mlflow_server

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")

TRIAL = [o for o in TINY if o != "+experiment=quickstart"] + ["tracking.log_model=false"]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free local port, SQLite behind it, artifacts served by it (tests.helpers'
    start_mlflow_server; the whole process group is stopped afterwards)."""
    port = free_port()
    server = start_mlflow_server(tmp_path / "mlflow_server", port)
    yield f"http://127.0.0.1:{port}"
    stop_mlflow_server(server)


def assert_one_study_in_mlflow(mlflow_server: str) -> None:
    """What two sweep processes of one 4-trial study leave on the server: one parent run, one FINISHED child
    run per trial with both epochs, and the sweep report (uploaded through the server)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("bloodcell.sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1  # both sweep processes log under the study's one parent run
    assert sorted(c.data.tags["trial_number"] for c in children) == ["0", "1", "2", "3"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.info.status for c in children} == {"FINISHED"}
    assert all(len(client.get_metric_history(c.info.run_id, "val_accuracy")) == 2 for c in children)
    assert "trials.csv" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}


def _storage(tmp_path: Path) -> str:
    return os.environ.get("BLOODCELL_TEST_POSTGRES") or f"journal:{tmp_path / 'optuna.journal'}"


@pytest.mark.slow
def test_two_sweeps_with_submitit_jobs_share_one_study_and_one_mlflow_server(tmp_path, mlflow_server):
    import optuna

    from bloodcell.sweep.trial import open_storage

    storage = _storage(tmp_path)
    study_name = f"multinode-{uuid.uuid4().hex[:8]}"  # a shared database may hold earlier studies
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}

    def start(folder: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bloodcell.train",
                "-m",
                "+sweeps=quick",
                *TRIAL,
                f"tracking.uri={mlflow_server}",
                f"hydra.sweeper.storage={storage}",
                f"hydra.sweeper.study_name={study_name}",
                "hydra.sweeper.n_trials=4",
                "hydra.sweeper.n_jobs=2",
                "hydra/launcher=submitit_local",
                "hydra.launcher.timeout_min=10",
                f"hydra.sweep.dir={tmp_path / folder}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    sweeps = [start("a"), start("b")]
    outputs = [p.communicate(timeout=1200)[0] for p in sweeps]
    for process, output in zip(sweeps, outputs):
        assert process.returncode == 0, output[-4000:]

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4  # no point tried twice
    # every trial ran in a submitit job of its own, which reopened its Optuna trial to report epochs
    assert all(len(t.intermediate_values) >= 1 for t in study.trials)
    assert (
        len(list((tmp_path / "a" / ".submitit").iterdir()))
        + len(list((tmp_path / "b" / ".submitit").iterdir()))
        >= 4
    )

    assert_one_study_in_mlflow(mlflow_server)
