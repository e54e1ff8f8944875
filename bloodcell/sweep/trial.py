"""The trial side of an Optuna sweep: where the study lives, and the Keras callback that reports each
epoch to Optuna and stops a trial its pruner gives up on.

The sweeper (hydra_plugins/bloodcell_optuna_sweeper) runs in its own process and hands every trial the
overrides ``+trial.storage``, ``+trial.study_name``, ``+trial.trial_id`` and ``+trial.number``; the trial
process reopens the same trial from the storage with ``optuna.trial.Trial(study, trial_id)``.

Storage URLs (``hydra.sweeper.storage``):

- null (default): ``journal:<project root>/mlruns/optuna.journal``, Optuna's journal file. Several
  processes (``n_jobs > 1`` with the joblib launcher, or several sweeps of one study) append to it under
  a file lock; Optuna recommends it over SQLite for many writers on one machine, and it also works on
  NFS, where SQLite's locking does not.
- ``journal:<path>``: another journal file (a relative path is taken from the project root).
- any SQLAlchemy URL Optuna accepts: ``sqlite:///mlruns/optuna.db`` (relative to the project root),
  ``postgresql://user:pw@host/db`` or ``mysql+pymysql://...`` for sweeps over several machines.
- ``grpc://host:port``: Optuna's gRPC storage proxy (``GrpcStorageProxy``) in front of one of those
  databases, served by ``python -m bloodcell.storage_proxy storage=<database URL> port=<port>``: hundreds
  to thousands of workers talk to the proxy, which caches the study, instead of each holding database
  connections (docs/sweeps.md, "Which storage").
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bloodcell import PROJECT_ROOT
from bloodcell.core.errors import UserError
from bloodcell.core.settings import TrialSchema

# the pruner table and builder, shared with the sweeper; `as make_pruner`: re-exported (the pruning
# benchmark imports it from here)
from bloodcell.sweep.tables import make_pruner as make_pruner

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial


log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_JOURNAL = PROJECT_ROOT / "mlruns" / "optuna.journal"

#: seconds a process waits for a gRPC storage proxy to answer before it gives up with one error line
GRPC_CONNECT_TIMEOUT = 30.0

#: trial system attribute holding the pruner spec ({"name": ..., "kwargs": {...}}) the sweeper chose
PRUNER_ATTR = "bloodcell:pruner"


def resolve_storage_url(storage: str | None) -> str:
    """The absolute storage URL for ``hydra.sweeper.storage`` (see the module docstring)."""
    if not storage:
        return f"journal:{DEFAULT_JOURNAL}"
    storage = str(storage)
    if storage.startswith("journal:"):
        return f"journal:{_project_path(storage[len('journal:') :].removeprefix('//'))}"
    if storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///") :]
        return f"sqlite:///{_project_path(path)}" if path and path != ":memory:" else storage
    if storage.startswith("grpc://"):
        grpc_address(storage)  # host and port, or one error line now rather than in every trial
        return storage
    if "://" not in storage:
        raise UserError(
            f"storage '{storage}' is not a storage URL; use journal:<file>, "
            "sqlite:///<file>.db, a database URL such as postgresql://user@host/db or grpc://host:port"
        )
    return storage


def grpc_address(url: str) -> tuple[str, int]:
    """(host, port) of a ``grpc://host:port`` storage URL."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise UserError(f"storage '{url}' is not grpc://host:port (e.g. grpc://localhost:13000)")
    return parts.hostname, port


def _project_path(path: str) -> Path:
    resolved = Path(path).expanduser()
    resolved = resolved if resolved.is_absolute() else PROJECT_ROOT / resolved
    resolved.parent.mkdir(parents=True, exist_ok=True)
    return resolved


def lock_path(url: str) -> Path | None:
    """A file beside a local storage that sweep processes on this machine lock around taking a trial;
    None for a database server (there the sweeper takes PostgreSQL's advisory lock, or elsewhere checks its
    trial's rank after asking)."""
    # not "<file>.lock": Optuna's journal backend takes that name for its own (symlink) lock
    if url.startswith("journal:"):
        return Path(url[len("journal:") :] + ".sweep-lock")
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url[len("sqlite:///") :] + ".sweep-lock")
    return None


def open_storage(url: str, retry_seconds: float = 0.0) -> BaseStorage:
    """An Optuna storage for a URL from `resolve_storage_url`. The sweeper writes the trials' system
    attributes and the study's through its methods (Study and Trial have none for them in Optuna 5).
    ``retry_seconds``: how long to try a database server that refuses connections (a trial's process, in
    an outage); a user's command says so at once."""

    if url.startswith("grpc://"):
        return _grpc_proxy(url)
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(url[len("journal:") :]))
        if url.startswith("sqlite:"):
            # trials of a batch write at once; wait for the file lock rather than fail at once
            return _rdb_storage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        return with_storage_retries(lambda: _rdb_storage(url), retry_seconds)
    except ImportError as err:
        raise UserError(
            f"the Optuna storage {redact(url)} needs a database driver ({err}); for PostgreSQL: "
            'pip install "psycopg[binary]" (or pip install -e ".[cluster]")'
        ) from None
    except Exception as err:  # unreachable server, bad credentials, not a database ...
        raise UserError(f"cannot open the Optuna storage {redact(url)}: {str(err).splitlines()[0]}") from None


def _grpc_proxy(url: str) -> BaseStorage:
    """A client of a running `bloodcell.storage_proxy` (Optuna's GrpcStorageProxy), checked to answer."""
    host, port = grpc_address(url)
    try:
        import grpc  # noqa: F401  (installed with TensorFlow; named here for a clear message without it)
        from optuna.exceptions import ExperimentalWarning
        from optuna.storages import GrpcStorageProxy
    except ImportError as err:
        raise UserError(
            f"the Optuna storage {url} needs grpcio ({err}): pip install grpcio "
            '(or pip install -e ".[cluster]")'
        ) from None
    # experimental since Optuna 4.2: said once in docs/sweeps.md, not in every trial's output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        proxy = GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=GRPC_CONNECT_TIMEOUT)
    except ConnectionError:
        raise UserError(
            f"no Optuna storage proxy answers at {url} (waited {GRPC_CONNECT_TIMEOUT:.0f} s); start one "
            f"there: python -m bloodcell.storage_proxy storage=<database URL> port={port}"
        ) from None
    return proxy


def _rdb_storage(url: str, **kwargs: Any) -> BaseStorage:
    """RDBStorage, retried when several processes create the schema of a new database at once: on
    PostgreSQL the losers of that race get a duplicate-type or duplicate-table error, and find the schema
    made on the next try."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (IntegrityError, ProgrammingError):
            time.sleep(0.5 * (attempt + 1))
    return optuna.storages.RDBStorage(url, **kwargs)  # the fourth try raises what it meets


def redact(url: str) -> str:
    """The URL without its password or tokens, for logs and MLflow (bloodcell.core.redaction)."""
    from bloodcell.core.redaction import mask_url

    return mask_url(url)


#: how long a trial's process keeps trying an Optuna storage call through a database outage (a restart, a
#: failover, connections terminated) before the trial fails
STORAGE_RETRY_SECONDS = 120.0


def with_storage_retries(call: Callable[[], T], retry_seconds: float = STORAGE_RETRY_SECONDS) -> T:
    """``call()``, tried again every 2 s while the storage's database cannot be reached. Without it a
    database restarting under a sweep failed every trial that reported an epoch meanwhile (the chaos soak,
    issue 26: PostgreSQL's connections terminated for a few seconds -> StorageInternalError -> FAIL)."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import DBAPIError

    deadline = time.monotonic() + retry_seconds
    said = False
    while True:
        try:
            return call()
        except (StorageInternalError, DBAPIError) as err:
            if time.monotonic() >= deadline:
                raise
            if not said:  # one line per outage
                first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                log.warning("Optuna storage unavailable (%s); trying again for up to %.0f s", redact(first),
                            retry_seconds)  # fmt: skip
                said = True
            time.sleep(2)


def open_trial(trial_cfg: TrialSchema | Any) -> tuple[optuna.trial.Trial, FrozenTrial]:
    """This job's Optuna trial (the ``trial`` settings, or a mapping of them: `TrialSchema.of`), reopened
    from the sweep's storage with the pruner the sweeper chose, and the trial as stored now (its reports
    so far)."""
    import optuna

    trial_settings = TrialSchema.of(trial_cfg)
    storage = open_storage(str(trial_settings.storage), retry_seconds=STORAGE_RETRY_SECONDS)
    trial_id = int(trial_settings.trial_id)
    frozen = with_storage_retries(lambda: storage.get_trial(trial_id))
    # the sampler is the sweeper's business; a random one keeps reopening the trial cheap
    study = with_storage_retries(
        lambda: optuna.load_study(
            study_name=str(trial_settings.study_name),
            storage=storage,
            sampler=optuna.samplers.RandomSampler(),
            pruner=make_pruner(frozen.system_attrs.get(PRUNER_ATTR)),
        )
    )
    return optuna.trial.Trial(study, trial_id), frozen
