"""Taking trials from the study, and giving back those whose sweep process died.

How ``n_trials`` stays a total over resumed runs and parallel sweep processes: a trial counts when it is
running or ended (complete, pruned, or failed by its own error); a trial whose sweep process died
(SIGKILL, a lost node) or was stopped goes back into Optuna's queue (WAITING) with its parameters and
pruning reports, and the next ask runs it again: its training resumes from its last checkpoint in its
own MLflow run (``MAX_INTERRUPTIONS`` times; then it is marked FAIL + ``interrupted``, does not count,
and its place is run anew). Before each ask, a process counts the trials under a lock: a file lock
beside a local storage (journal / SQLite), PostgreSQL's advisory lock on a PostgreSQL server, so
processes never ask one trial too many. Where no lock is shared (a gRPC storage proxy, MySQL) it asks
first and, when its trial ranks beyond ``n_trials`` (another process asked at the same instant), puts it
back in Optuna's queue (WAITING), unrun: the next ask takes it, and a study that already has its
``n_trials`` keeps it queued for a later, longer sweep.

A running trial carries its sweep process (host, pid) and a heartbeat time as system attributes. It is
interrupted when that process is gone from this host, or, when it runs on another host, its heartbeat is
``STALE_AFTER_BEATS`` intervals old.

Module-level functions of the sweep (``_impl.OptunaSweep``, as ``Sweep`` says), whose storage, study and
trials in flight they read and change.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from bloodcell.sweep.trial import PRUNER_ATTR, lock_path, redact, with_storage_retries

from ._parent_run import ParentRun, fail_child, link
from ._search_space import SearchSpace

log = logging.getLogger(__name__)

OWNER_ATTR = "bloodcell:owner"
HEARTBEAT_ATTR = "bloodcell:heartbeat"
STALE_AFTER_BEATS = 4
#: a trial interrupted this often is given up (FAIL) rather than queued again: it may be what kills its job
MAX_INTERRUPTIONS = 3


class Sweep(Protocol):
    """What taking and giving back trials reads and changes of the sweep (``_impl.OptunaSweep``)."""

    storage: Any  # the storage this process opened: its methods are public, unlike Study's and Trial's
    storage_url: str
    study: optuna.Study
    study_id: int
    n_trials: int
    space: SearchSpace
    pruner_spec: dict[str, Any]
    rerun_prefix: list[str]
    owner: dict[str, Any]
    in_flight: dict[int, Claimed]
    mlflow: ParentRun | None


@dataclass
class Claimed:
    """A trial this process took from the study: the Optuna trial, and its storage id (Optuna's Trial keeps
    the id private; the trial process reopens the trial by it, and the storage's methods take it)."""

    id: int
    trial: optuna.trial.Trial


def new_owner(heartbeat_interval: int) -> dict[str, Any]:
    """This sweep process, as its trials carry it (system attribute ``OWNER_ATTR``)."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": uuid.uuid4().hex,
        "interval": int(heartbeat_interval),
    }


def counts_toward_total(trial: FrozenTrial) -> bool:
    if trial.state == TrialState.FAIL:
        return "interrupted" not in trial.user_attrs
    return trial.state != TrialState.WAITING


@contextlib.contextmanager
def storage_lock(storage_url: str, storage: Any = None) -> Iterator[None]:
    """A lock the sweep processes of one storage share around counting and taking trials, creating the
    study and its parent run: a file lock beside a local storage (journal / SQLite), for the processes of
    one machine; PostgreSQL's advisory lock when ``storage`` is an RDBStorage on PostgreSQL, for every
    machine; none otherwise (gRPC proxy, MySQL: `claim` ranks its trial instead)."""
    path = lock_path(storage_url or "")
    if path is not None:
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    engine = getattr(storage, "engine", None)  # RDBStorage's SQLAlchemy engine (public attribute)
    if engine is None or engine.dialect.name != "postgresql":
        yield
        return
    with _advisory_lock(engine):
        yield


#: the advisory lock's key: any fixed bigint, the same in every sweep process (crc32 of the name below)
ADVISORY_LOCK_KEY = zlib.crc32(b"bloodcell.sweep.storage_lock")


@contextlib.contextmanager
def _advisory_lock(engine: Any) -> Iterator[None]:
    """PostgreSQL's session advisory lock on a connection of its own: the server releases it when the
    connection ends, so a sweep process killed while holding it blocks nobody. A database that cannot be
    reached to take it is not waited for here: the storage calls inside retry or fail on their own, and
    `claim`'s rank check still keeps the total."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    try:
        connection = engine.connect()
    except DBAPIError as err:
        connection, why = None, err
    else:
        try:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        except DBAPIError as err:
            connection.invalidate()
            connection, why = None, err
    if connection is None:
        log.warning("could not take the sweep lock on PostgreSQL (%s): going on without it",
                    redact(str(why).splitlines()[0][:200]))  # fmt: skip
        yield
        return
    try:
        yield
    finally:
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
            connection.close()
        except DBAPIError:  # the connection is gone, and the lock with it
            connection.invalidate()


def _trial_id(sweep: Sweep, number: int) -> int:
    """The storage id of trial ``number`` of the study (unique: Optuna numbers a study's trials under a
    lock of the study)."""
    return sweep.storage.get_trial_id_from_study_id_trial_number(sweep.study_id, number)


def end_trial(
    study: optuna.Study, trial: optuna.trial.Trial | int, state: TrialState, value: float | None = None
) -> None:
    """study.tell, less GridSampler's request to stop once the grid is covered (study.stop works only
    inside study.optimize; the trial is told all the same)."""
    try:  # through a database outage; a tell that went through before its error is refused as told
        with_storage_retries(lambda: study.tell(trial, value, state=state))
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


def claim(sweep: Sweep) -> Claimed | None:
    """A trial for this process (a new one, or one given back), owned by it and with its settings, or None
    when the study has its ``n_trials``."""
    storage, study = sweep.storage, sweep.study
    with storage_lock(sweep.storage_url, storage):
        recover_interrupted(sweep)
        if sum(map(counts_toward_total, study.get_trials(deepcopy=False))) >= sweep.n_trials:
            return None
        trial = study.ask(fixed_distributions=sweep.space.distributions)
        claimed = Claimed(_trial_id(sweep, trial.number), trial)
        # system attributes: Trial.set_system_attr is gone in Optuna 5, the storage's method is public
        storage.set_trial_system_attr(claimed.id, OWNER_ATTR, sweep.owner)
        storage.set_trial_system_attr(claimed.id, HEARTBEAT_ATTR, time.time())
        sweep.in_flight[claimed.id] = claimed
    # Processes on other machines share no lock: the trial's rank among the counted ones decides
    # (numbers follow the order trials were created in, as Optuna numbers them under a lock of the study).
    ahead = [
        t for t in study.get_trials(deepcopy=False) if t.number < trial.number and counts_toward_total(t)
    ]
    if len(ahead) >= sweep.n_trials:
        del sweep.in_flight[claimed.id]
        # back into Optuna's queue (what study.enqueue_trial makes, for the next ask): no Study or Trial
        # method sets a trial WAITING; the storage's method does
        storage.set_trial_state_values(claimed.id, TrialState.WAITING)
        log.info(
            "trial %d was asked at the same time as another process's last trial (no lock is shared on "
            "%s): not run, it waits in the study's queue for the next ask",
            trial.number,
            redact(sweep.storage_url),
        )
        return None
    storage.set_trial_system_attr(claimed.id, PRUNER_ATTR, sweep.pruner_spec)
    dropped = sweep.space.dropped(trial.params)
    if dropped:  # a trial interrupted before the sweeps file changed: it goes on as it was sampled
        log.warning(
            "trial %d was sampled with %s, which this sweep no longer searches: it runs again with the "
            "values it had (%s)",
            trial.number,
            ", ".join(dropped),
            ", ".join(f"{name}={trial.params[name]}" for name in dropped),
        )
    trial.set_user_attr(
        "overrides", sweep.rerun_prefix + sweep.space.overrides_for(trial.params)[len(sweep.space.fixed) :]
    )
    return claimed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(sweep: Sweep) -> None:
    """Give back every running trial of another sweep process that is gone from this host, or, on another
    host, has sent no heartbeat for ``STALE_AFTER_BEATS`` intervals."""
    now, me = time.time(), sweep.owner
    for t in sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(OWNER_ATTR)
        if not owner or owner.get("token") == me["token"]:
            continue
        beat = float(t.system_attrs.get(HEARTBEAT_ATTR, 0.0))
        if owner.get("host") == me["host"]:
            # on this host the process table is the truth: a live owner keeps its trial however late
            # its heartbeats are (a loaded machine delays them; judging it interrupted ran a trial twice)
            gone, silent = not _pid_alive(int(owner.get("pid", -1))), False
        else:
            gone = False
            silent = now - beat > STALE_AFTER_BEATS * int(owner.get("interval", me["interval"]))
        if gone or silent:
            why = "its sweep process is gone" if gone else "its sweep process stopped sending heartbeats"
            interrupt(sweep, _trial_id(sweep, t.number), t.number, why)


def interrupt(sweep: Sweep, trial_id: int, number: int, why: str) -> None:
    """A trial that did not end by itself goes back into the study's queue (WAITING) with its parameters
    and its pruning reports: the next ask takes it again, and its training resumes from its last
    checkpoint in its own MLflow run (bloodcell.training.resume), so it counts once toward n_trials. After
    ``MAX_INTERRUPTIONS`` it is marked FAIL + interrupted (not counted; a new trial runs instead)."""
    storage = sweep.storage
    try:
        interruptions = int(storage.get_trial(trial_id).user_attrs.get("interruptions", 0)) + 1
        # the trial may be another process's: no Trial object here, so the storage's method
        storage.set_trial_user_attr(trial_id, "interruptions", interruptions)
        if interruptions > MAX_INTERRUPTIONS:
            storage.set_trial_user_attr(trial_id, "interrupted", why)
            if sweep.mlflow is not None:  # its run (made now if it has none) and the link, while it can
                fail_child(sweep.mlflow, number, f"interrupted: {why}", trial_id=trial_id)
                link(sweep.mlflow, number, trial_id, storage)
            end_trial(sweep.study, number, TrialState.FAIL)
        else:
            # no Study or Trial method sets a trial WAITING; the storage's method does
            storage.set_trial_state_values(trial_id, TrialState.WAITING)
    except (RuntimeError, ValueError):  # UpdateFinishedTrialError, or tell's "Cannot tell a FAIL trial"
        return  # ended meanwhile, or another process marked it first
    finally:
        sweep.in_flight.pop(trial_id, None)
    if interruptions > MAX_INTERRUPTIONS:
        log.warning("trial %d interrupted (%s) %d times: marked FAIL, its place will be run again",
                    number, why, interruptions)  # fmt: skip
    else:
        log.warning(
            "trial %d interrupted (%s): back in the queue, it resumes from its checkpoint", number, why
        )
    if sweep.mlflow is not None and interruptions <= MAX_INTERRUPTIONS:
        # its job makes its run when it starts again: none made here (a trial would have two)
        fail_child(sweep.mlflow, number, f"interrupted: {why}", create=False, trial_id=trial_id)


def send_heartbeats(sweep: Sweep, stop: threading.Event) -> None:
    """Every ``interval`` seconds until ``stop``: the time, on each trial this process runs."""
    while not stop.wait(sweep.owner["interval"]):
        for claimed_id in list(sweep.in_flight):
            with contextlib.suppress(Exception):  # a system attribute: the storage's method, as in claim
                sweep.storage.set_trial_system_attr(claimed_id, HEARTBEAT_ATTR, time.time())
