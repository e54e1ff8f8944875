"""The suite's shared fixtures; the shared helpers they use are in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import sqlite_store, write_npz
from tests.tiny_runs import TinyRuns, shared


@pytest.fixture(autouse=True)
def environment_kept():
    """Each test leaves the environment as it found it. Code a test runs in-process (the API, MLflow) may
    set variables, and what one test left reached the commands that later tests of the same process
    started: a sampling interval left by an in-process run once took a later sweep's system metrics."""
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture
def tracking(tmp_path) -> str:
    """A new SQLite MLflow store for one test."""
    return sqlite_store(tmp_path / "mlruns" / "mlflow.db")


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    """A competition-layout file of 64 synthetic 32x32 cells, labels (N, 1) uint8."""
    from bloodcell.data import make_demo_set

    images, labels = make_demo_set(per_class=8, image_size=32, seed=1)
    return write_npz(tmp_path / "training_set.npz", images, labels.astype(np.uint8).reshape(-1, 1))


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> TinyRuns:
    """Three tiny finished runs on one SQLite store, trained once for the whole session (all test
    processes): see tests/tiny_runs.py. Read only: a test that writes works on ``tiny_runs.copy(folder)``."""
    return shared(tmp_path_factory)


# The test modules by the time they took (seconds on 2 workers, 2 cores), slowest first. `--dist loadfile`
# hands whole modules to the workers in collection order (`--no-loadscope-reorder`: by default xdist puts
# the modules with the most tests first, which left the slow modules of one to three tests for the end,
# one worker running them while the other waited); slowest first, the short modules fill in at the end and
# the workers finish together. A module not listed keeps its place after these; the figures only order.
SLOWEST_FIRST = {
    "e2e/test_slurm.py": 282,
    "e2e/test_sweep.py": 260,  # + the backbone study (35 s)
    "e2e/test_train.py": 185,
    "unit/api/test_training.py": 165,  # measured on 2 workers at load 4-7 (2026-12-07), like the two below
    "e2e/test_notebook.py": 135,
    "e2e/test_resume.py": 170,
    "e2e/test_tracking_outage.py": 156,
    "e2e/test_augment.py": 155,
    "e2e/test_winners.py": 137,
    "e2e/test_looking_at_runs.py": 131,
    "e2e/test_promote_predict_submit.py": 102,
    "e2e/test_sweep_repeats.py": 84,
    "e2e/test_ensemble.py": 81,
    "unit/api/test_runs.py": 80,
    "e2e/test_distill.py": 71,
    "e2e/test_plain_mlflow.py": 70,  # issue 27: fresh-Python loads, mlflow models serve and predict
    "e2e/test_weight_averaging.py": 65,
    "e2e/test_bad_input_cases.py": 62,
    "e2e/test_multi_node.py": 50,
    "e2e/test_phase1_reuse.py": 50,
    "e2e/test_sweep_faults.py": 50,  # issue 26: not measured idle (137 s at load 9)
    "e2e/test_clean.py": 40,
    "e2e/test_grpc_proxy.py": 39,
    "unit/data/cleaning/test_clean_embedding.py": 33,
    "unit/models/test_efficientnet_lite.py": 25,
    "e2e/test_secrets.py": 35,  # issue 26 added a run and a server beside the sweep (93 s at load 8)
    "e2e/test_disk_full.py": 17,
    "e2e/test_bad_input.py": 10,
}


def pytest_collection_modifyitems(config, items) -> None:
    """Slowest modules first (SLOWEST_FIRST); a module's tests keep their order (some build on each other)."""
    tests = Path(__file__).parent
    order = list(SLOWEST_FIRST)

    def rank(item) -> int:
        module = Path(item.path).relative_to(tests).as_posix()
        return order.index(module) if module in SLOWEST_FIRST else len(order)

    items.sort(key=rank)  # stable
