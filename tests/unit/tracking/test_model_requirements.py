"""The requirements a logged model carries (issue 29): pinned to the running TensorFlow, Keras and MLflow,
without MLflow building its map of every installed distribution for the check, and without leaving that
map changed for the rest of the process. A real model logged to a real SQLite store."""

from __future__ import annotations

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.utils import requirements_utils

from bloodcell.tracking.outbox import log_keras_model
from tests.helpers import mlflow_at, sqlite_store


def tiny_model() -> keras.Model:
    inputs = keras.Input((4, 4, 3))
    return keras.Model(inputs, keras.layers.Dense(8, activation="softmax")(keras.layers.Flatten()(inputs)))


def logged_requirements(tmp_path, model: keras.Model) -> tuple[list[str], str]:
    examples = np.zeros((2, 4, 4, 3), np.float32)
    with mlflow_at(sqlite_store(tmp_path / "mlflow.db")), mlflow.start_run() as run:
        info = log_keras_model(model, examples, model.predict(examples, verbose=0))
        path = mlflow.pyfunc.get_model_dependencies(info.model_uri)
    return open(path).read().split(), run.info.run_id


def test_a_logged_model_pins_this_tensorflow_keras_and_mlflow_and_leaves_mlflows_map_unbuilt(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    monkeypatch.chdir(tmp_path)
    built = []
    real = requirements_utils.importlib_metadata.packages_distributions
    monkeypatch.setattr(
        requirements_utils.importlib_metadata,
        "packages_distributions",
        lambda: built.append(1) or real(),
    )
    requirements, _ = logged_requirements(tmp_path, tiny_model())
    assert f"tensorflow=={tf.__version__}" in requirements
    assert f"keras=={keras.__version__}" in requirements
    assert f"mlflow=={mlflow.__version__}" in requirements
    assert not built  # the map of every installed distribution was never built
    assert requirements_utils._MODULES_TO_PACKAGES is None  # and is built as before when MLflow needs it
    requirements_utils._init_modules_to_packages_map()
    assert requirements_utils._MODULES_TO_PACKAGES.get("tensorflow") == ["tensorflow"]


def test_a_map_mlflow_had_already_built_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    requirements_utils._init_modules_to_packages_map()
    before = requirements_utils._MODULES_TO_PACKAGES
    requirements, _ = logged_requirements(tmp_path, tiny_model())
    assert f"keras=={keras.__version__}" in requirements
    assert requirements_utils._MODULES_TO_PACKAGES is before
