"""Bad input: one `error:` line naming the problem and the fix, exit 2, before any training and
without creating an MLflow run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import TINY, assert_user_error, run_module, write_npz


def train(tmp_path: Path, *overrides: str):
    db = tmp_path / "mlruns" / "mlflow.db"
    proc = run_module("bloodcell.train", *TINY, f"tracking.uri=sqlite:///{db}", *overrides, timeout=120)
    return proc, db


def assert_no_run(db: Path) -> None:
    if db.exists():
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{db}")
        assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_missing_data_file_says_where_to_put_it(tmp_path):
    proc, db = train(tmp_path, "data=npz", f"data.path={tmp_path}/nowhere/training_set.npz")
    assert_user_error(proc, "not found", "training_set.npz", "+experiment=quickstart")
    assert_no_run(db)


@pytest.mark.parametrize(
    "images, labels, fragment",
    [
        (np.zeros((16, 32, 32), np.uint8), np.zeros(16, np.uint8), "expected (N, H, W, 3)"),
        (np.zeros((16, 32, 32, 3), np.float32), np.zeros(16, np.uint8), "expected uint8"),
        (np.zeros((16, 32, 32, 3), np.uint8), np.full((16, 1), 9, np.uint8), "outside 0-7"),
        (np.full((16, 32, 32, 3), np.nan, np.float32), np.zeros(16, np.uint8), "NaN"),
        (np.zeros((16, 32, 32, 3), np.uint8), np.full(16, np.nan), "NaN"),
        (np.zeros((16, 32, 32, 3), np.uint8), np.zeros(15, np.uint8), "labels have shape"),
    ],
    ids=["greyscale", "float-pixels", "label-9", "nan-pixels", "nan-labels", "count-mismatch"],
)
def test_malformed_npz(tmp_path, images, labels, fragment):
    path = write_npz(tmp_path / "bad.npz", images, labels)
    proc, db = train(tmp_path, "data=npz", f"data.path={path}")
    assert_user_error(proc, str(path), fragment)
    assert_no_run(db)


def test_unknown_backbone_lists_the_known_ones(tmp_path):
    proc, db = train(tmp_path, "backbone.name=resnet9000")
    assert_user_error(proc, "resnet9000", "efficientnetb2", "mobilenet", "small_cnn")
    assert_no_run(db)


def test_missing_weights_file(tmp_path):
    proc, db = train(tmp_path, "backbone=mobilenet", f"backbone.weights={tmp_path}/missing.h5")
    assert_user_error(proc, "missing.h5", "not found", "null")
    assert_no_run(db)


def test_unknown_precision_policy_lists_the_known_ones(tmp_path):
    proc, db = train(tmp_path, "trainer.mixed_precision=float8")
    assert_user_error(proc, "trainer.mixed_precision='float8'", "mixed_bfloat16")
    assert_no_run(db)


def test_unreachable_tracking_server(tmp_path):
    proc = run_module("bloodcell.train", *TINY, "tracking.uri=http://127.0.0.1:9", timeout=120)
    assert_user_error(proc, "http://127.0.0.1:9", "unreachable")


def test_unknown_data_format(tmp_path):
    proc, db = train(tmp_path, "data.format=parquet")
    assert_user_error(proc, "parquet", "npz, folder, medmnist, demo")
