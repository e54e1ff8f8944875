"""The review threshold a model carries (`bloodcell.serving.review`), read back from a real MLflow store:
a model is traced to its run from every kind of URI, and every way of having no threshold is one line."""

from __future__ import annotations

import math

import pytest

from bloodcell.core.errors import UserError
from bloodcell.serving.review import source_run_id, stored_guarantee
from tests.helpers import sqlite_store

CERTIFIED = {
    "abstention/confidence": 0.9,
    "abstention/batch_cells": 1000,
    "abstention/calibration_images": 2049,
    "abstention/threshold_at_95_accuracy": 0.41,
    "abstention/calibration_coverage_at_95_accuracy": 0.99,
    "abstention/threshold_at_99_accuracy": 0.83,
    "abstention/calibration_coverage_at_99_accuracy": 0.96,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store (already migrated: tests.helpers.sqlite_store) with a run per case and the certified
    one registered as bloodcell@champion; one for the module, which only reads it."""
    import mlflow

    tmp_path = tmp_path_factory.mktemp("review")
    client = mlflow.MlflowClient(sqlite_store(tmp_path / "mlflow.db"))
    experiment = client.create_experiment("review", artifact_location=(tmp_path / "artifacts").as_uri())
    runs = {}
    for name, metrics in {
        "certified": CERTIFIED,
        "none_found": {**CERTIFIED, "abstention/threshold_at_99_accuracy": math.nan},
        "older": {"abstention/threshold_at_99_accuracy": 0.79},  # a point estimate, from before
    }.items():
        run = client.create_run(experiment, run_name=name)
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
        runs[name] = run.info.run_id
    client.create_registered_model("bloodcell")
    version = client.create_model_version("bloodcell", f"runs:/{runs['certified']}/model", runs["certified"])
    client.set_registered_model_alias("bloodcell", "champion", version.version)
    return client, runs


def test_every_kind_of_model_uri_leads_to_its_run(store):
    client, runs = store
    certified = runs["certified"]
    assert source_run_id("models:/bloodcell@champion", client) == certified
    assert source_run_id("models:/bloodcell/1", client) == certified
    assert source_run_id("models:/bloodcell/latest", client) == certified
    assert source_run_id(f"runs:/{certified}/model", client) == certified
    assert source_run_id("/some/model.keras", client) is None


def test_the_certified_threshold_comes_back_with_its_promise(store):
    client, runs = store
    guarantee, run_id = stored_guarantee("models:/bloodcell@champion", 0.99, client)
    assert run_id == runs["certified"]
    assert (guarantee.threshold, guarantee.confidence, guarantee.calibration_images) == (0.83, 0.9, 2049)
    assert guarantee.batch_cells == 1000
    promise = "kept cells >= 99% correct with 90% confidence (any batch of >= 1000 kept cells)"
    assert guarantee.promise() == promise
    assert stored_guarantee("models:/bloodcell/1", 0.95, client)[0].threshold == 0.41


@pytest.mark.parametrize(
    ("case", "target", "message"),
    [
        ("file", 0.99, "is a file, not a model logged by a run"),
        ("older", 0.99, "trained before they were logged): retrain it, or use review_below"),
        ("certified", 0.9, "has review thresholds for 0.95, 0.99, not 0.9"),
        ("none_found", 0.99, "found no threshold that keeps >= 99% correct with 90% confidence (any batch"),
    ],
)
def test_a_model_without_that_threshold_is_one_line(store, case, target, message):
    client, runs = store
    uri = "/some/model.keras" if case == "file" else f"runs:/{runs[case]}/model"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        stored_guarantee(uri, target, client)
