"""The suite's shared fixtures; the shared helpers they use are in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import sqlite_store, write_npz
from tests.tiny_runs import TinyRuns, shared


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
