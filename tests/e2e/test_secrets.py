"""No secret in any record (issue 18): a sweep whose config holds URLs with passwords, one given the
documented way (``${oc.env:...}``) and one written out on the command line, leaves neither password in any
file it writes (Hydra's folders, the MLflow store and its artifacts, the Optuna storage) nor on its console,
while the trials still get the real values.

With BLOODCELL_TEST_POSTGRES (e.g. postgresql://bloodcell:bloodcell@localhost/optuna) the study lives in
that database, so the Optuna storage URL carries a real password too; otherwise in SQLite.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.helpers import TINY, assert_ok, run_module, sqlite_store

TRIAL = [o for o in TINY if o != "+experiment=quickstart"] + ["tracking.log_model=false", "finetune.epochs=0"]
FROM_ENV = "plantedsecret-env"
WRITTEN = "plantedsecret-cli"


def _leaks(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {needle.decode()}" for needle in needles if needle in data]
    return found


@pytest.mark.slow
def test_no_password_is_written_or_printed_by_a_sweep(tmp_path):
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
    proc = run_module(
        "bloodcell.train",
        "-m",
        "+sweeps=quick",
        *TRIAL,
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.study_name={study}",
        "hydra.sweeper.storage=${oc.env:OPTUNA_STORAGE}",  # the documented way
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        f"tracking.uri={sqlite_store(tmp_path / 'mlruns' / 'mlflow.db')}",
        "+notify_url=${oc.env:HOOK_URL}",  # a *_url key, the documented way
        f"+backup_url=postgresql://backup:{WRITTEN}@localhost/db",  # written out on the command line
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    assert_ok(proc)
    console = proc.stdout + proc.stderr
    assert not [n for n in needles if n.decode() in console], console[-3000:]
    assert not _leaks(tmp_path, needles)

    trials = optuna.load_study(study_name=study, storage=open_storage(storage)).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # the trials reached the storage
    stored = repr([(t.params, t.user_attrs, t.system_attrs) for t in trials])
    assert not [n for n in needles if n.decode() in stored], stored

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    children = [run for run in runs if "trial_number" in run.data.tags]
    assert len(children) == 2 and all(run.info.status == "FINISHED" for run in children)
    # the trials had the values (masked in what they recorded)
    assert children[0].data.params["notify_url"] == "postgresql://hook:***@localhost/db"
    assert children[0].data.params["backup_url"] == "postgresql://backup:***@localhost/db"
