"""How the sweeper takes, hands back, interrupts and ends trials, on a real Optuna storage but without
Hydra or training: each Optuna call it makes is public API (or a method of the storage it opened)."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from bloodcell.sweep.trial import PRUNER_ATTR, open_storage
from hydra_plugins.bloodcell_optuna_sweeper._claims import (
    HEARTBEAT_ATTR,
    OWNER_ATTR,
    claim,
    interrupt,
    storage_lock,
)
from hydra_plugins.bloodcell_optuna_sweeper._impl import OptunaSweep
from hydra_plugins.bloodcell_optuna_sweeper._parent_run import summary_counts
from hydra_plugins.bloodcell_optuna_sweeper._search_space import parse_search_space
from hydra_plugins.bloodcell_optuna_sweeper.config import BloodcellOptunaSweeperConf
from tests.helpers import free_port


def bare_sweep(url: str, n_trials: int, study_name: str = "s") -> OptunaSweep:
    """An OptunaSweep as `_prepare` leaves it, less Hydra (no launcher, no MLflow)."""
    sweep = OptunaSweep.__new__(OptunaSweep)
    sweep.options = BloodcellOptunaSweeperConf()
    sweep.storage_url = url
    sweep.storage = open_storage(url)
    sweep.study = optuna.create_study(study_name=study_name, storage=sweep.storage, load_if_exists=True)
    sweep.study_id = sweep.storage.get_study_id_from_name(study_name)
    sweep.study_name, sweep.objective_name, sweep.n_trials = study_name, "val_accuracy", n_trials
    sweep.space = parse_search_space(["+experiment=quickstart", "finetune.lr=interval(0, 1)"])
    sweep.rerun_prefix = ["+experiment=quickstart"]
    sweep.pruner_spec = {"name": "median", "kwargs": {}}
    sweep.owner = {"host": "here", "pid": os.getpid(), "token": uuid.uuid4().hex, "interval": 30}
    sweep.in_flight, sweep.mlflow, sweep.failures_in_a_row, sweep.last_error = {}, None, 0, ""
    return sweep


@pytest.fixture
def journal(tmp_path) -> str:
    return f"journal:{tmp_path / 'optuna.journal'}"


def test_claimed_trials_carry_their_id_owner_pruner_and_rerun_overrides(journal):
    sweep = bare_sweep(journal, n_trials=2)
    batch = [claim(sweep), claim(sweep)]
    assert claim(sweep) is None  # n_trials reached
    for claimed in batch:
        assert claimed is not None
        frozen = sweep.storage.get_trial(claimed.id)
        assert frozen.number == claimed.trial.number
        assert frozen.system_attrs[OWNER_ATTR] == sweep.owner
        assert frozen.system_attrs[HEARTBEAT_ATTR] <= time.time()
        assert frozen.system_attrs[PRUNER_ATTR] == sweep.pruner_spec
        assert frozen.user_attrs["overrides"] == [
            "+experiment=quickstart",
            f"finetune.lr={frozen.params['finetune.lr']}",
        ]
        assert f"++trial.trial_id={claimed.id}" in sweep._trial_overrides(claimed)
    assert set(sweep.in_flight) == {c.id for c in batch if c is not None}


def test_a_trial_ranked_beyond_n_trials_goes_back_to_the_queue(journal, monkeypatch, caplog):
    # two machines share no lock (a gRPC proxy's URL: no lock file, no database lock); the other takes
    # the last place between this one's count and its ask
    here, there = bare_sweep(journal, n_trials=1), bare_sweep(journal, n_trials=1)
    here.storage_url = there.storage_url = "grpc://proxy-host:13000"
    ask = here.study.ask

    def ask_after_the_other_machine(**kwargs):
        assert claim(there) is not None
        return ask(**kwargs)

    monkeypatch.setattr(here.study, "ask", ask_after_the_other_machine)
    with caplog.at_level(logging.INFO):
        assert claim(here) is None
    assert [t.state for t in here.study.get_trials()] == [TrialState.RUNNING, TrialState.WAITING]
    assert here.in_flight == {}
    assert "trial 1 was asked at the same time as another process's last trial" in caplog.text
    assert summary_counts(here.study.get_trials())["waiting"] == 1  # the sweep's summary says so
    # the queued trial is the next one taken, once there is room
    there.n_trials = 2
    claimed = claim(there)
    assert claimed is not None and claimed.trial.number == 1


POSTGRES = os.environ.get("BLOODCELL_TEST_POSTGRES")


@pytest.mark.skipif(not POSTGRES, reason="needs BLOODCELL_TEST_POSTGRES (scripts/ci_services.sh)")
def test_on_postgresql_sweep_processes_take_trials_one_at_a_time_under_an_advisory_lock():
    """On PostgreSQL every machine shares the database's advisory lock: while one sweep process counts
    and asks, another waits, so no trial is ever asked beyond n_trials (the gRPC proxy has no such lock:
    the test above)."""
    assert POSTGRES is not None
    first, second = open_storage(POSTGRES), open_storage(POSTGRES)  # two processes' own connections
    holding, entered, release = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        with storage_lock(POSTGRES, first):
            holding.set()
            release.wait(30)

    def take() -> None:
        with storage_lock(POSTGRES, second):
            entered.set()

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    taker = threading.Thread(target=take)
    taker.start()
    assert not entered.wait(1.0)  # blocked while the lock is held (without the lock: entered at once)
    release.set()
    assert entered.wait(30)  # and goes on once it is released
    holder.join(30)
    taker.join(30)

    # the race of the test above, on PostgreSQL: two sweeps claim the last place at the same instant
    study_name = f"lock-{uuid.uuid4().hex[:8]}"
    sweeps = []
    for _ in range(2):
        sweep = bare_sweep(POSTGRES, n_trials=1, study_name=study_name)
        sweeps.append(sweep)
    start = threading.Barrier(2)
    results: list = []

    def claim_at_once(sweep: OptunaSweep) -> None:
        start.wait(30)
        results.append(claim(sweep))

    threads = [threading.Thread(target=claim_at_once, args=(s,)) for s in sweeps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert sorted(r is None for r in results) == [False, True]
        assert [t.state for t in sweeps[0].study.get_trials()] == [TrialState.RUNNING]  # none put back
    finally:
        optuna.delete_study(study_name=study_name, storage=sweeps[0].storage)


def test_a_postgresql_lock_that_cannot_be_taken_is_said_and_the_claim_goes_on(caplog):
    """A database that refuses connections at that moment: the sweep is not stopped by its lock (the rank
    check keeps the total, the storage's own calls retry)."""
    from types import SimpleNamespace

    import sqlalchemy

    port = free_port()  # nothing listens there
    unreachable = SimpleNamespace(
        engine=sqlalchemy.create_engine(f"postgresql+psycopg://u@127.0.0.1:{port}/db")
    )
    entered = False
    with caplog.at_level(logging.WARNING), storage_lock(f"postgresql://u@127.0.0.1:{port}/db", unreachable):
        entered = True
    assert entered
    assert "could not take the sweep lock on PostgreSQL" in caplog.text


def test_a_trial_whose_sweep_stopped_beating_goes_back_to_the_queue_and_is_taken_again(journal):
    """Issue 14: an interrupted trial keeps its number, parameters and reports, and runs again (its
    training resumes from its checkpoint), so it counts once toward n_trials."""
    gone, alive = bare_sweep(journal, n_trials=1), bare_sweep(journal, n_trials=1)
    gone.owner["host"] = "node-7"  # another machine: only its heartbeats say whether it still runs
    claimed = claim(gone)
    assert claimed is not None
    gone.storage.set_trial_system_attr(claimed.id, HEARTBEAT_ATTR, 0.0)
    taken = claim(alive)  # recovers the silent trial first: back in the queue, and the next ask takes it
    assert taken is not None and taken.trial.number == 0 and taken.id == claimed.id
    assert taken.trial.params == claimed.trial.params
    frozen = alive.storage.get_trial(claimed.id)
    assert frozen.state == TrialState.RUNNING and frozen.user_attrs["interruptions"] == 1
    assert len(alive.study.get_trials(deepcopy=False)) == 1  # no new trial in its place


def test_a_requeued_trial_keeps_a_parameter_the_resumed_sweep_no_longer_searches(journal, caplog):
    """Issue 26: a sweep killed mid-trial, its sweeps file then edited to drop a parameter, and resumed: the
    interrupted trial runs again with every value it was sampled with (the dropped one forced in with ++,
    whether or not the config has the key), and the log says so; it raised KeyError before."""
    gone = bare_sweep(journal, n_trials=1)
    gone.space = parse_search_space(
        ["+experiment=quickstart", "finetune.lr=interval(0, 1)", "+finetune.extra=int(interval(1, 3))"]
    )
    gone.owner["host"] = "node-7"
    claimed = claim(gone)
    assert claimed is not None and set(claimed.trial.params) == {"finetune.lr", "finetune.extra"}
    gone.storage.set_trial_system_attr(claimed.id, HEARTBEAT_ATTR, 0.0)
    resumed = bare_sweep(journal, n_trials=1)  # searches finetune.lr alone
    with caplog.at_level("WARNING"):
        taken = claim(resumed)
    assert taken is not None and taken.id == claimed.id
    lr, extra = (claimed.trial.params[k] for k in ("finetune.lr", "finetune.extra"))
    frozen = resumed.storage.get_trial(claimed.id)
    assert frozen.user_attrs["overrides"] == [
        "+experiment=quickstart",
        f"finetune.lr={lr}",
        f"++finetune.extra={extra}",
    ]
    assert f"++finetune.extra={extra}" in resumed._trial_overrides(taken)
    assert "trial 0 was sampled with finetune.extra, which this sweep no longer searches" in caplog.text


def test_a_live_sweep_on_this_host_keeps_its_trial_however_late_its_heartbeats(journal):
    """A loaded machine can delay the heartbeat thread; on one host the process table decides, so a trial
    whose sweep process is alive is never judged interrupted and run twice."""
    slow, other = bare_sweep(journal, n_trials=2), bare_sweep(journal, n_trials=2)
    claimed = claim(slow)
    assert claimed is not None
    slow.storage.set_trial_system_attr(claimed.id, HEARTBEAT_ATTR, 0.0)  # silent for decades, pid alive
    taken = claim(other)
    assert taken is not None and taken.trial.number == 1  # a new trial, not the slow one's
    frozen = other.storage.get_trial(claimed.id)
    assert frozen.state == TrialState.RUNNING and "interruptions" not in frozen.user_attrs


def test_a_trial_interrupted_more_than_max_interruptions_is_given_up(journal):
    from hydra_plugins.bloodcell_optuna_sweeper._claims import MAX_INTERRUPTIONS

    sweep = bare_sweep(journal, n_trials=1)
    claimed = claim(sweep)
    assert claimed is not None
    for _ in range(MAX_INTERRUPTIONS):
        interrupt(sweep, claimed.id, 0, "its sweep process is gone")
        assert sweep.storage.get_trial(claimed.id).state == TrialState.WAITING
        sweep.storage.set_trial_state_values(claimed.id, TrialState.RUNNING)  # taken again
    interrupt(sweep, claimed.id, 0, "its sweep process is gone")
    frozen = sweep.storage.get_trial(claimed.id)
    assert frozen.state == TrialState.FAIL and frozen.user_attrs["interrupted"] == "its sweep process is gone"
    interrupt(sweep, claimed.id, 0, "again")  # already ended: nothing happens
    assert sweep.storage.get_trial(claimed.id).user_attrs["interrupted"] == "its sweep process is gone"


@pytest.mark.parametrize(
    ("returned", "state"),
    [
        (0.75, TrialState.COMPLETE),
        (optuna.TrialPruned("at 1"), TrialState.PRUNED),
        (OSError("disk"), TrialState.FAIL),
    ],
)
def test_tell_ends_the_trial_as_the_job_did(journal, returned, state):
    sweep = bare_sweep(journal, n_trials=1)
    claimed = claim(sweep)
    assert claimed is not None
    failed = isinstance(returned, Exception)
    sweep._tell(
        claimed,
        JobReturn(status=JobStatus.FAILED if failed else JobStatus.COMPLETED, _return_value=returned),
        1.0,
    )
    frozen = sweep.storage.get_trial(claimed.id)
    assert frozen.state == state
    assert sweep.in_flight == {}
    if state == TrialState.COMPLETE:
        assert frozen.value == 0.75
    if state == TrialState.FAIL:
        assert frozen.user_attrs["error"] == "OSError: disk"
        assert sweep.failures_in_a_row == 1


def test_tell_of_a_trial_another_process_interrupted_meanwhile_keeps_the_job_s_outcome(journal):
    sweep, other = bare_sweep(journal, n_trials=1), bare_sweep(journal, n_trials=1)
    claimed = claim(sweep)
    assert claimed is not None
    interrupt(other, claimed.id, claimed.trial.number, "its sweep process stopped sending heartbeats")
    sweep._tell(claimed, JobReturn(status=JobStatus.COMPLETED, _return_value=0.5), 1.0)
    frozen = sweep.storage.get_trial(claimed.id)
    assert frozen.state == TrialState.COMPLETE and frozen.value == 0.5  # the job did finish
    assert sweep.in_flight == {}


def test_a_requeued_trial_gets_no_second_run_and_a_given_up_one_links_its_run(journal, tmp_path):
    """Issue 26 (the chaos soak): interrupting a trial whose job had not started its MLflow run yet made a
    placeholder run, and the resumed job then made its own (two runs for one trial); a trial given up after
    MAX_INTERRUPTIONS ended without its link to its run."""
    from mlflow.tracking import MlflowClient

    from hydra_plugins.bloodcell_optuna_sweeper._claims import MAX_INTERRUPTIONS
    from hydra_plugins.bloodcell_optuna_sweeper._parent_run import ParentRun, children
    from tests.helpers import mlflow_at, sqlite_store

    uri = sqlite_store(tmp_path / "mlflow.db")
    with mlflow_at(uri):
        client = MlflowClient(uri)
        experiment_id = client.create_experiment("sweep")
        sweep = bare_sweep(journal, n_trials=1)
        sweep.mlflow = ParentRun(client, client.create_run(experiment_id).info.run_id, experiment_id)
        claimed = claim(sweep)
        assert claimed is not None
        interrupt(sweep, claimed.id, 0, "its job process was lost")  # before its job made a run
        assert children(sweep.mlflow, 0) == []  # its job makes its run when it starts again
        for _ in range(MAX_INTERRUPTIONS):
            sweep.storage.set_trial_state_values(claimed.id, TrialState.RUNNING)  # taken again, lost again
            interrupt(sweep, claimed.id, 0, "its job process was lost")
        frozen = sweep.storage.get_trial(claimed.id)
        assert frozen.state == TrialState.FAIL
        (run,) = children(sweep.mlflow, 0)  # given up: every trial has its run, linked both ways
        assert frozen.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["optuna_trial_id"] == str(claimed.id) and run.info.status == "FAILED"


def test_a_sweep_ending_while_its_tracking_server_restarts_still_ends_its_parent_run(
    journal, tmp_path, monkeypatch
):
    """Issue 26 (the chaos soak's last finding): the server was down as the sweep finished, and its parent
    run stayed RUNNING. A real mlflow server, killed and started again 6 s later."""
    from mlflow.tracking import MlflowClient

    from hydra_plugins.bloodcell_optuna_sweeper._parent_run import ParentRun
    from tests.helpers import RestartingServer, free_port, mlflow_at

    with RestartingServer(tmp_path / "server", free_port(), monkeypatch) as server, mlflow_at(server.uri):
        client = MlflowClient(server.uri)
        experiment_id = client.create_experiment("sweep")
        run_id = client.create_run(experiment_id).info.run_id
        sweep = bare_sweep(journal, n_trials=1)
        sweep.mlflow, sweep.sweep_dir = ParentRun(client, run_id, experiment_id), tmp_path / "multirun"
        sweep.sweep_dir.mkdir()
        server.restart(after=6)
        sweep._finish("FINISHED")
        server.wait()
        assert client.get_run(run_id).info.status == "FINISHED"
