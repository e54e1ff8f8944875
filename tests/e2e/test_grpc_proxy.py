"""Issue 16, item 8: sweeps through Optuna's gRPC storage proxy (``hydra.sweeper.storage=grpc://host:port``),
served by ``python -m bloodcell.storage_proxy`` in front of a SQLite database, or PostgreSQL when
``BLOODCELL_TEST_POSTGRES=postgresql://user:pw@host/db`` is set (scripts/local_postgres.sh starts one)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydra_plugins.bloodcell_optuna_sweeper._parent_run import PARENT_RUN_ATTR
from tests.helpers import TINY, assert_user_error, free_port, run_module, sqlite_store

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
TRIAL = [o for o in TINY if o != "+experiment=quickstart"] + ["tracking.log_model=false"]


def _database(tmp: Path) -> str:
    postgres = os.environ.get("BLOODCELL_TEST_POSTGRES")
    if not postgres:
        return f"sqlite:///{tmp / 'optuna.db'}"
    import optuna

    # a study name of this test's own; earlier runs' studies of that name go
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name="grpc-proxy-test", storage=postgres)
    return postgres


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, "-m", *args], cwd=cwd, env=ENV, stdout=out, stderr=subprocess.STDOUT, text=True
        )


def _sweep(tmp: Path, url: str, name: str) -> subprocess.Popen:
    args = [
        "bloodcell.train",
        "-m",
        "+sweeps=quick",
        *TRIAL,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.study_name=grpc-proxy-test",
        f"hydra.sweeper.storage={url}",
        f"tracking.uri={sqlite_store(tmp / 'mlflow.db')}",
        f"hydra.sweep.dir={tmp / name}",
    ]
    return _start(args, tmp, tmp / f"{name}.log")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_two_sweep_processes_share_one_study_through_the_grpc_proxy(tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    from bloodcell.sweep.trial import open_storage

    port = free_port()
    url = f"grpc://127.0.0.1:{port}"
    proxy = _start(
        ["bloodcell.storage_proxy", f"storage={_database(tmp_path)}", "host=127.0.0.1", f"port={port}"],
        tmp_path,
        tmp_path / "proxy.log",
    )
    sweeps: list[subprocess.Popen] = []
    try:
        storage = open_storage(url)  # waits until the proxy answers
        sweeps.append(_sweep(tmp_path, url, "a"))
        # the second process starts once the first made the study and its MLflow parent run, as
        # docs/sweeps.md advises: through a proxy the sweepers share no lock, and two that start at the same
        # instant could both read run index n = 0 (seeding their samplers alike) or open two parent runs
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and sweeps[0].poll() is None:
            summaries = optuna.get_all_study_summaries(storage)
            studies = [s for s in summaries if s.study_name == "grpc-proxy-test"]
            if studies and PARENT_RUN_ATTR in studies[0].user_attrs:
                break
            time.sleep(0.5)
        sweeps.append(_sweep(tmp_path, url, "b"))
        for sweep in sweeps:
            sweep.wait(timeout=900)
        logs = [(tmp_path / f"{name}.log").read_text() for name in ("a", "b")]
        for sweep, log in zip(sweeps, logs):
            assert sweep.returncode == 0, log[-4000:]

        study = optuna.load_study(study_name="grpc-proxy-test", storage=storage)
        # n_trials is a total: exactly 3 trials ran. The processes share no lock through a proxy, so both
        # may ask for the last place at once; the one ranked beyond it is put back unrun (WAITING) and
        # said so (the storage tests of tests/unit/hydra_plugins/test_sweeper_claims.py pin that rule)
        ran = [t for t in study.trials if t.state.name != "WAITING"]
        queued = [t for t in study.trials if t.state.name == "WAITING"]
        assert [t.state.name for t in ran] == ["COMPLETE"] * 3
        assert sorted(t.number for t in ran) == [0, 1, 2]
        assert all(t.intermediate_values for t in ran)  # trials reported epochs through the proxy
        assert [t.number for t in queued] in ([], [3])  # one process, one trial at a time: at most one extra
        assert not any(t.intermediate_values for t in queued)
        said = sum("waits in the study's queue for the next ask" in log for log in logs)
        assert said == len(queued), logs
        assert all("COMPLETE val_accuracy=" in log for log in logs), logs  # both processes ran trials

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("quickstart")
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        parents = [r for r in runs if r.data.tags.get("bloodcell.sweep") == "true"]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1  # both processes log to the study's one parent run
        assert sorted(c.data.tags["trial_number"] for c in children) == ["0", "1", "2"]
        assert {c.info.status for c in children} == {"FINISHED"}
        assert parents[0].data.params["storage"] == url
    finally:
        for process in [*sweeps, proxy]:
            _stop(process)


def test_storage_proxy_refuses_a_journal_file_and_a_taken_port(tmp_path):
    assert_user_error(
        run_module("bloodcell.storage_proxy", f"storage=journal:{tmp_path / 'o.journal'}", cwd=tmp_path),
        "not a journal file",
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_module(
            "bloodcell.storage_proxy",
            f"storage=sqlite:///{tmp_path / 'o.db'}",
            "host=127.0.0.1",
            f"port={port}",
            cwd=tmp_path,
        )
    assert_user_error(proc, f"cannot listen on 127.0.0.1:{port}")
