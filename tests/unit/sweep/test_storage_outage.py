"""A trial's reports go through a database outage (issue 26, found by the chaos soak: PostgreSQL's
connections terminated for a few seconds failed both running trials with StorageInternalError). Real
PostgreSQL (BLOODCELL_TEST_POSTGRES; skipped without it); only this test's own connections are ended."""

from __future__ import annotations

import os
import uuid

import optuna
import pytest

from bloodcell.training.callbacks import OptunaPruning

POSTGRES = os.environ.get("BLOODCELL_TEST_POSTGRES")


@pytest.mark.skipif(not POSTGRES, reason="needs BLOODCELL_TEST_POSTGRES (scripts/ci_services.sh)")
def test_an_epoch_report_survives_the_databases_connections_being_terminated():
    import psycopg

    assert POSTGRES is not None
    name = f"bloodcell-outage-{uuid.uuid4().hex[:8]}"
    url = POSTGRES.replace("postgresql://", "postgresql+psycopg://", 1)
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"application_name": name}})
    study = optuna.create_study(study_name=name, storage=storage, pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    pruning = OptunaPruning(trial, "val_accuracy")
    pruning.report(0.5, 0)  # the trial's connection is open and pooled

    with psycopg.connect(POSTGRES.replace("postgresql+psycopg://", "postgresql://")) as admin:
        query = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s"
        ended = admin.execute(query, (name,)).fetchone()
    assert ended is not None and ended[0] >= 1

    pruning.report(0.6, 1)  # raised StorageInternalError: the pooled connection was gone
    assert storage.get_trial(trial._trial_id).intermediate_values == {0: 0.5, 1: 0.6}
    optuna.delete_study(study_name=name, storage=storage)
