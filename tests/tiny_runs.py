"""Tiny finished runs trained once for the whole test session and shared by the tests that read runs
(ensemble, distill, promote/predict/submit, compare and the champion gate, resume refusing a finished run):
the fixture ``tiny_runs`` of tests/conftest.py.

One SQLite store, every run on the same data and split (``TINY_HEAD_ONLY``, seed 42):

- experiment ``quickstart``: run ``quickstart``, alone there, as `python -m bloodcell.train
  +experiment=quickstart` makes it;
- experiment ``members``: a hand-made sweep parent ``sweep`` (FINISHED) with two children, ``a`` computing at
  the images' 32 px as TINY does and ``b`` resizing them to 48 px inside the model
  (``backbone.input_size=48``), so that the two members differ.

Under pytest-xdist the store is trained by the first worker that asks for it, under a file lock in the
session's shared temporary folder; the other workers wait for it and use the same one. A test that writes
to a store works on its own copy (:meth:`TinyRuns.copy`): the database is copied, the artifacts it already
holds are read where they are (runs logged later write their own new folders beside them, never into an
existing one), so no test sees another's writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, TINY_HEAD_ONLY, command_environment, sqlite_store

#: what each training run of the store adds to TINY_HEAD_ONLY
_ARGS = {
    "quickstart": [],
    "a": ["tracking.experiment=members"],
    "b": ["tracking.experiment=members", "backbone.input_size=48"],
}


@dataclasses.dataclass(frozen=True)
class TinyRuns:
    folder: str  # mlflow.db and artifacts/: read only, copy() before writing
    quickstart: str  # run ids
    sweep: str
    a: str
    b: str
    quickstart_experiment: str  # experiment ids
    members_experiment: str

    @property
    def db(self) -> Path:
        return Path(self.folder) / "mlflow.db"

    def copy(self, folder: Path) -> str:
        """The store as ``folder/mlflow.db`` for one test module or test to write to; its tracking URI."""
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.db, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"


def _train_at_once(runs: dict[str, list[str]]) -> None:
    """``python -m bloodcell.train`` for each entry, all started together (the tiny runs are mostly
    single-threaded start-up: side by side they take little longer than one)."""
    env = command_environment()
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "bloodcell.train", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in runs.items()
    }
    failed = []
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        if proc.returncode != 0:
            failed.append(
                f"{name}: exit {proc.returncode}\nstdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-4000:]}"
            )
    assert not failed, "\n\n".join(failed)


def build(folder: Path) -> TinyRuns:
    """Train the store into ``folder`` (emptied first)."""
    from mlflow.tracking import MlflowClient

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    uri = sqlite_store(folder / "mlflow.db")
    client = MlflowClient(uri)
    members = client.create_experiment("members", artifact_location=(folder / "artifacts").as_uri())
    sweep = client.create_run(members, run_name="sweep-parent").info.run_id
    _train_at_once(
        {
            name: [
                *TINY_HEAD_ONLY,
                *extra,
                f"tracking.uri={uri}",
                *([f"tracking.parent_run_id={sweep}"] if name != "quickstart" else []),
            ]
            for name, extra in _ARGS.items()
        }
    )
    client.set_terminated(sweep, "FINISHED")
    quickstart = client.get_experiment_by_name("quickstart").experiment_id
    (q,) = client.search_runs([quickstart])
    children = client.search_runs([members], f"tags.mlflow.parentRunId = '{sweep}'")
    [a] = [r.info.run_id for r in children if r.data.params["backbone.input_size"] == "32"]
    [b] = [r.info.run_id for r in children if r.data.params["backbone.input_size"] == "48"]
    return TinyRuns(str(folder), q.info.run_id, sweep, a, b, quickstart, members)


def shared(tmp_path_factory) -> TinyRuns:
    """The session's store: built by the first test process that asks, found by the others."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    marker = root / "tiny-runs.json"
    with FileLock(str(root / "tiny-runs.lock")):
        if marker.is_file():
            return TinyRuns(**json.loads(marker.read_text()))
        runs = build(root / "tiny-runs")
        marker.write_text(json.dumps(dataclasses.asdict(runs)))
        return runs
