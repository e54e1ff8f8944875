"""Issue 18: every bad input a user met stops before any training with one `error:` line, exit status 2,
no traceback and no MLflow run; a folder data set with a corrupt JPEG trains, says so and records it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bloodcell.data import make_demo_set
from tests.helpers import (
    TINY,
    assert_ok,
    assert_user_error,
    cut_short,
    demo_npz,
    jpeg_file,
    run_module,
    truncated_copy,
    write_image_folder,
    write_npz,
)


def _npz(tmp: Path) -> Path:
    return demo_npz(tmp, column_labels=True)


def _truncated(tmp: Path) -> Path:
    return truncated_copy(_npz(tmp))


def _one_class(tmp: Path) -> Path:
    images, labels = make_demo_set(8, 32, seed=1)
    return write_npz(tmp / "one.npz", images, np.zeros_like(labels))


def _folder(tmp: Path) -> Path:
    return write_image_folder(tmp / "cells", per_class=12)


def _corrupt_one(folder: Path) -> str:
    """Cuts one JPEG short; returns its path relative to the folder."""
    victim = sorted((folder / "eosinophil").iterdir())[0]
    cut_short(victim, 200)
    return f"eosinophil/{victim.name}"


def _strict_folder(tmp: Path) -> Path:
    folder = _folder(tmp)
    _corrupt_one(folder)
    return folder


Make = Callable[[Path], object]
TRAIN_CASES: list[tuple[str, Make, list[str], list[str]]] = [
    # (id, makes the input, overrides ({} = its path), fragments of the one error line)
    ("truncated-npz", _truncated, ["data=npz", "data.path={}"], ["half.npz", "truncated"]),
    ("folder-as-file", lambda tmp: tmp, ["data=npz", "data.path={}"], ["is a folder", "data=folder"]),
    ("dev-null", lambda tmp: "/dev/null", ["data=npz", "data.path={}"], ["/dev/null is not a regular file"]),
    ("jpeg-as-npz", jpeg_file, ["data=npz", "data.path={}"], ["cell.jpg is a JPEG image", "not an npz"]),
    ("one-class", _one_class, ["data=npz", "data.path={}"], ["one class (basophil)", "at least 2 classes"]),
    ("limit-5", lambda tmp: None, ["data.limit=5"], ["data.limit=5", "needs 48 images"]),
    ("batch-0", lambda tmp: None, ["trainer.batch_size=0"], ["trainer.batch_size=0", "e.g."]),
    ("batch-minus-4", lambda tmp: None, ["trainer.batch_size=-4"], ["trainer.batch_size=-4"]),
    ("lr-minus-1", lambda tmp: None, ["trainer.lr=-1"], ["trainer.lr=-1", "must be > 0"]),
    ("lr-0", lambda tmp: None, ["trainer.lr=0"], ["trainer.lr=0", "must be > 0"]),
    ("finetune-lr-0", lambda tmp: None, ["finetune.lr=0"], ["finetune.lr=0", "must be > 0"]),
    ("strength-2", lambda tmp: None, ["augmentation.strength=2"], ["augmentation.strength=2", "1"]),
    ("strict-folder", _strict_folder, ["data=folder", "data.path={}", "data.strict=true"],
     ["cannot be read", "eosinophil/", "data.strict=false"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "make, overrides, fragments", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES]
)
def test_train_refuses_bad_input_before_anything_starts(tmp_path, make, overrides, fragments):
    made = make(tmp_path)
    db = tmp_path / "mlruns" / "mlflow.db"
    args = [arg.format(made) for arg in overrides]
    proc = run_module("bloodcell.train", *TINY, f"tracking.uri=sqlite:///{db}", *args, timeout=120)
    assert_user_error(proc, *fragments)
    if db.exists():
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{db}")
        assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_predict_and_clean_refuse_a_truncated_npz(tmp_path):
    half = _truncated(tmp_path)
    proc = run_module(
        "bloodcell.predict", "model=nowhere.keras", f"input={half}", f"output={tmp_path / 'p.csv'}"
    )
    assert_user_error(proc, "half.npz", "truncated")
    proc = run_module("bloodcell.clean", f"input={half}", f"output={tmp_path / 'clean.npz'}")
    assert_user_error(proc, "half.npz", "truncated")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "clean.npz").exists()


def test_predict_refuses_a_model_that_keras_safe_mode_refuses(tmp_path):
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(lambda t: t / 255.0)(inputs)  # code inside the file: what safe mode refuses
    outputs = keras.layers.Dense(8, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inputs, outputs).save(tmp_path / "lambda.keras")
    proc = run_module(
        "bloodcell.predict",
        f"model={tmp_path / 'lambda.keras'}",
        f"input={_npz(tmp_path)}",
        f"output={tmp_path / 'p.csv'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert_user_error(proc, "lambda.keras", "safe mode")
    assert not (tmp_path / "p.csv").exists()


def test_a_corrupt_jpeg_in_a_folder_is_skipped_named_and_recorded(tmp_path, tracking):
    folder = _folder(tmp_path)
    victim = _corrupt_one(folder)
    proc = run_module(
        "bloodcell.train", *TINY, "data=folder", f"data.path={folder}", f"tracking.uri={tracking}",
        "tracking.log_model=false", "finetune.epochs=0", timeout=600,
    )  # fmt: skip
    assert_ok(proc)
    output = proc.stdout + proc.stderr
    assert "skipped 1 image file(s)" in output and victim in output, output[-3000:]
    import mlflow

    mlflow.set_tracking_uri(tracking)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data_skipped_images"] == 1
    listed = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/data/skipped_images.txt")
    assert victim in listed
