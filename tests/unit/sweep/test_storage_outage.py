"""A trial's reports go through a database outage (issue 26, found by the chaos soak: PostgreSQL's
connections terminated for a few seconds failed both running trials with StorageInternalError). Real
PostgreSQL (BLOODCELL_TEST_POSTGRES; skipped without it); only this test's own connections are ended."""

from __future__ import annotations

import os
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from bloodcell.sweep.trial import with_storage_retries
from bloodcell.training.callbacks import OptunaPruning
from hydra_plugins.bloodcell_optuna_sweeper._claims import end_trial

POSTGRES = os.environ.get("BLOODCELL_TEST_POSTGRES")


def _terminate(application_name: str) -> None:
    """End every connection of this test's storage (its application name), as a database restart would."""
    import psycopg

    assert POSTGRES is not None
    with psycopg.connect(POSTGRES) as admin:
        query = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s"
        ended = admin.execute(query, (application_name,)).fetchone()
    assert ended is not None and ended[0] >= 1


@pytest.mark.skipif(not POSTGRES, reason="needs BLOODCELL_TEST_POSTGRES (scripts/ci_services.sh)")
def test_a_trials_reports_and_end_survive_the_databases_connections_being_terminated():
    assert POSTGRES is not None
    name = f"bloodcell-outage-{uuid.uuid4().hex[:8]}"
    url = POSTGRES.replace("postgresql://", "postgresql+psycopg://", 1)
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"application_name": name}})
    study = optuna.create_study(study_name=name, storage=storage, pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    pruning = OptunaPruning(trial, "val_accuracy")
    pruning.report(0.5, 0)  # the trial's connection is open and pooled

    _terminate(name)

    pruning.report(0.6, 1)  # raised StorageInternalError: the pooled connection was gone
    assert storage.get_trial(trial._trial_id).intermediate_values == {0: 0.5, 1: 0.6}

    _terminate(name)  # again, now under the sweeper's own calls: the link to the run, the trial's end
    with pytest.raises(optuna.exceptions.StorageInternalError):
        trial.set_user_attr("kept", 1)  # what a call without retries meets
    with_storage_retries(lambda: storage.get_trial(trial._trial_id))  # a live connection in the pool again
    _terminate(name)
    with_storage_retries(lambda: trial.set_user_attr("mlflow_run_id", "abc"))
    with_storage_retries(lambda: storage.get_trial(trial._trial_id))
    _terminate(name)
    end_trial(study, trial, TrialState.COMPLETE, 0.6)
    ended = storage.get_trial(trial._trial_id)
    assert ended.state == TrialState.COMPLETE and ended.user_attrs["mlflow_run_id"] == "abc"
    optuna.delete_study(study_name=name, storage=storage)


def _admin(sql: str) -> None:
    import subprocess

    subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-qtAX", "-v", "ON_ERROR_STOP=1", "-c", sql],
                   check=True, capture_output=True)  # fmt: skip


@pytest.mark.skipif(
    not POSTGRES or os.geteuid() != 0, reason="needs BLOODCELL_TEST_POSTGRES and root (runuser)"
)
def test_a_trial_opens_its_storage_through_a_database_refusing_connections():
    """A trial that started while the database refused connections ended FAIL ("cannot open the Optuna
    storage"); a database of the test's own is refused for 3 s (a user's command still fails at once)."""
    import threading
    import time
    from urllib.parse import urlsplit, urlunsplit

    from bloodcell.core.errors import UserError
    from bloodcell.sweep.trial import open_storage

    assert POSTGRES is not None
    database = f"bloodcell_outage_{uuid.uuid4().hex[:8]}"
    parts = urlsplit(POSTGRES)
    url = urlunsplit(parts._replace(path=f"/{database}"))
    _admin(f"CREATE DATABASE {database} OWNER {parts.username}")
    try:
        _admin(f"ALTER DATABASE {database} WITH ALLOW_CONNECTIONS false")
        with pytest.raises(UserError, match="cannot open the Optuna storage"):
            open_storage(url)
        timer = threading.Timer(3, _admin, [f"ALTER DATABASE {database} WITH ALLOW_CONNECTIONS true"])
        timer.start()
        begun = time.monotonic()
        storage = open_storage(url, retry_seconds=60)
        assert 2 < time.monotonic() - begun < 60
        timer.join()
        optuna.create_study(study_name="s", storage=storage)
        storage.engine.dispose()
    finally:
        _admin(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
