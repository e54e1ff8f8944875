"""No secret in any record (issues 18 and 26): a sweep whose config holds URLs with passwords, one given the
documented way (``${oc.env:...}``) and others written out on the command line (the tracking server's URL
among them), leaves no password in any file it writes (Hydra's folders, the MLflow server's store and its
artifacts, the checkpoints, the Optuna storage) nor on its console, while the trials still get the real
values; and so does a single run whose ``tracking.uri`` holds a password (Hydra's ``.hydra/`` files are
written before bloodcell runs: a callback masks them). The tracking server is a real ``mlflow server``,
which takes the URL's user and password as basic auth and ignores them.

With BLOODCELL_TEST_POSTGRES (e.g. postgresql://bloodcell:bloodcell@localhost/optuna) the study lives in
that database, so the Optuna storage URL carries a real password too; otherwise in SQLite.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.helpers import (
    TINY,
    TINY_HEAD_ONLY,
    Started,
    assert_ok,
    free_port,
    run_module,
    start_mlflow_server,
    stop_mlflow_server,
)

TRIAL = [o for o in TINY if o != "+experiment=quickstart"] + ["tracking.log_model=false", "finetune.epochs=0"]
FROM_ENV = "plantedsecret-env"
WRITTEN = "plantedsecret-cli"
WARNING = "holds a password in plain text"


@pytest.fixture(scope="module")
def mlflow_port(tmp_path_factory):
    port = free_port()
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"), port)
    yield port
    stop_mlflow_server(server)


def _leaks(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {needle.decode()}" for needle in needles if needle in data]
    return found


@pytest.mark.slow
def test_no_password_is_written_or_printed_by_a_sweep_or_a_run(tmp_path, mlflow_port):
    import optuna

    from bloodcell.sweep.trial import open_storage

    postgres = os.environ.get("BLOODCELL_TEST_POSTGRES")
    storage = postgres or f"sqlite:///{tmp_path / 'optuna.db'}"
    study = f"secrets-{uuid.uuid4().hex[:8]}"  # a shared database may hold earlier studies
    needles = [FROM_ENV.encode(), WRITTEN.encode()]
    if postgres and urlsplit(postgres).password:
        parts = urlsplit(postgres)
        needles.append(f"{parts.username}:{parts.password}@".encode())  # the password as a URL holds it
    env = {"HOOK_URL": f"postgresql://hook:{FROM_ENV}@localhost/db", "OPTUNA_STORAGE": storage}
    server_url = f"http://127.0.0.1:{mlflow_port}"
    with_password = f"http://alice:{WRITTEN}@127.0.0.1:{mlflow_port}"
    # a run beside the sweep (one run's wall time for both): Hydra's .hydra/ files, its log, its checkpoints
    run = Started(
        "bloodcell.train",
        *TINY_HEAD_ONLY,
        "tracking.log_model=false",
        f"tracking.uri={with_password}",
        f"hydra.run.dir={tmp_path / 'outputs'}",
        f"trainer.checkpoint.dir={tmp_path / 'checkpoints'}",
        "trainer.checkpoint.keep_after_finish=true",
        cwd=tmp_path,
    )
    proc = run_module(
        "bloodcell.train",
        "-m",
        "+sweeps=quick",
        *TRIAL,
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.study_name={study}",
        "hydra.sweeper.storage=${oc.env:OPTUNA_STORAGE}",  # the documented way
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        f"tracking.uri={with_password}",
        f"trainer.checkpoint.dir={tmp_path / 'checkpoints'}",
        "trainer.checkpoint.keep_after_finish=true",
        "+notify_url=${oc.env:HOOK_URL}",  # a *_url key, the documented way
        f"+backup_url=postgresql://backup:{WRITTEN}@localhost/db",  # written out on the command line
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    single = run.finish()
    assert_ok(proc)
    assert_ok(single)
    for console in (proc.stdout + proc.stderr, single.stdout + single.stderr):
        assert not [n for n in needles if n.decode() in console], console[-3000:]
    assert (tmp_path / "outputs" / ".hydra" / "overrides.yaml").is_file()
    assert list((tmp_path / "checkpoints").rglob("state.json"))
    assert not _leaks(tmp_path, needles)
    # said once per key written out, by the sweeper (its trials get references) and by the run
    sweep_console = proc.stdout + proc.stderr
    for key in ("tracking.uri", "backup_url"):
        assert sweep_console.count(f"{key} {WARNING}") == 1, sweep_console[-3000:]
    assert (single.stdout + single.stderr).count(WARNING) == 1

    trials = optuna.load_study(study_name=study, storage=open_storage(storage)).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # the trials reached the storage
    stored = repr([(t.params, t.user_attrs, t.system_attrs) for t in trials])
    assert not [n for n in needles if n.decode() in stored], stored

    import mlflow

    mlflow.set_tracking_uri(server_url)
    runs = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    children = [run for run in runs if "trial_number" in run.data.tags]
    assert len(children) == 2 and all(run.info.status == "FINISHED" for run in children)
    assert len(runs) == 4  # the sweep's parent run, its 2 trials and the single run: all reached the server
    # the trials had the values (masked in what they recorded)
    assert children[0].data.params["notify_url"] == "postgresql://hook:***@localhost/db"
    assert children[0].data.params["backup_url"] == "postgresql://backup:***@localhost/db"
