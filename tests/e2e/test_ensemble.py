"""`python -m bloodcell.ensemble` end to end: two tiny runs of one sweep, one of them resizing its 32 px
images to 48 px inside the model, averaged into one model that is logged, promoted, predicted with and
submitted (the bundle runs in an interpreter without bloodcell).

The steps below share one copy of the session's tiny runs (tests/tiny_runs.py) and run in file order.
"""

from __future__ import annotations

import csv
import subprocess
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from bloodcell import CLASS_NAMES
from tests.helpers import assert_ok, logged_run_id, run_bundle, run_module


@pytest.fixture(scope="module")
def store(tiny_runs, tmp_path_factory):
    """Two trials of a hand-made sweep (the session's tiny runs, tests/tiny_runs.py): A computing at the
    images' 32 px, B with an in-model resize to 48 px; on a copy of their store."""
    import mlflow

    root = tmp_path_factory.mktemp("ensemble")
    uri = tiny_runs.copy(root)
    client = mlflow.MlflowClient(uri)
    a, b, sweep, experiment = tiny_runs.a, tiny_runs.b, tiny_runs.sweep, tiny_runs.members_experiment
    assert client.get_run(a).data.params["backbone.input_size"] == "32"
    assert client.get_run(b).data.params["backbone.input_size"] == "48"
    from bloodcell.data import make_demo_set

    images, labels = make_demo_set(per_class=2, image_size=32, seed=3)
    np.savez(root / "cells.npz", images=images, labels=labels)
    return SimpleNamespace(root=root, uri=uri, client=client, sweep=sweep, a=a, b=b, experiment=experiment)


def stored(store, run_id: str, split: str):
    from bloodcell.evaluation.stored_predictions import stored_predictions

    found = stored_predictions(store.client, run_id, split)
    assert found is not None, f"run {run_id} kept no {split} predictions"
    return found


def ensemble_run(store, proc: subprocess.CompletedProcess):
    assert_ok(proc)
    return store.client.get_run(logged_run_id(proc))


@pytest.fixture(scope="module")
def plain(store):
    """runs=[A,B], every member once, no temperature: the plain average."""
    proc = run_module(
        "bloodcell.ensemble", f"runs=[{store.a},{store.b}]", "calibrate=false", f"tracking.uri={store.uri}"
    )
    return ensemble_run(store, proc)


def test_ensemble_run_holds_the_mean_of_its_members_probabilities_and_a_training_runs_records(store, plain):
    members = [store.a, store.b]
    for split in ("test", "val"):
        mine, theirs = stored(store, plain.info.run_id, split), [stored(store, m, split) for m in members]
        assert all(np.array_equal(mine.data_index, t.data_index) for t in theirs)
        assert np.allclose(mine.probabilities, np.mean([t.probabilities for t in theirs], axis=0), atol=1e-5)
        assert np.array_equal(mine.labels, theirs[0].labels)
    test = stored(store, plain.info.run_id, "test")
    metrics, params, tags = plain.data.metrics, plain.data.params, plain.data.tags
    assert metrics["test_accuracy"] == pytest.approx(np.mean(test.predicted == test.labels))
    assert metrics["best_val_accuracy"] == metrics["final_val_accuracy"]
    assert {"test_macro_f1", "test_accuracy_ci_low", "final_val_macro_f1", "ensemble_members"} <= set(metrics)
    assert params["ensemble.members"] == "2" and params["ensemble.weights"] == "[1, 1]"
    assert tags["ensemble.member_runs"] == f"{store.a},{store.b}" and tags["bloodcell.ensemble"] == "true"
    assert (tags["ensemble.member_0"], tags["ensemble.member_1"]) == (store.a, store.b)
    member = store.client.get_run(store.a)
    for key in ("data_fingerprint", "split_fingerprint", "data_source"):
        assert tags[key] == member.data.tags[key]
    assert params["model_name"] == member.data.params["model_name"] == "bloodcell-demo"
    assert "mlflow.parentRunId" not in tags and plain.info.experiment_id == store.experiment
    artifacts = {
        f.path
        for d in ("", "plots", "predictions")
        for f in store.client.list_artifacts(plain.info.run_id, d)
    }
    assert {"config.yaml", "classification_report.json", "plots/confusion_matrix.png"} <= artifacts
    assert {"predictions/test.npz", "predictions/val.npz"} <= artifacts
    assert "plots/training_curves.png" not in artifacts  # it had no epochs
    import mlflow

    mlflow.set_tracking_uri(store.uri)
    signature = mlflow.models.get_model_info(tags["model_uri"]).signature
    assert list(signature.inputs.inputs[0].shape) == [-1, 32, 32, 3]


def test_the_plain_average_loads_in_a_fresh_python_without_bloodcell(store, plain):
    """The uncalibrated ensemble is plain Keras too (issue 27): mlflow.pyfunc and mlflow.keras load it, safe
    mode on, in a process that cannot import bloodcell, and it gives the probabilities its run stored."""
    from bloodcell.training.run_data import split_images
    from tests.plain_mlflow import assert_plain_keras, fresh_load

    test = stored(store, plain.info.run_id, "test")
    images = split_images(store.client.get_run(store.a), "test", test.data_index)
    uri = plain.data.tags["model_uri"]
    loaded = fresh_load([uri], images, store.uri, store.root / "fresh_plain")[uri]
    assert_plain_keras(loaded)
    for way in ("pyfunc", "keras"):
        np.testing.assert_allclose(loaded[way], test.probabilities, atol=1e-5)


def test_ensemble_promotes_by_run_id(store, plain):
    proc = run_module("bloodcell.promote", f"run={plain.info.run_id}", f"tracking.uri={store.uri}")
    assert_ok(proc)
    holder = store.client.get_model_version_by_alias("bloodcell-demo", "champion")
    assert holder.run_id == plain.info.run_id and holder.source == plain.data.tags["model_uri"]


@pytest.fixture(scope="module")
def predictions(store, plain):
    output = store.root / "pred.csv"
    proc = run_module(
        "bloodcell.predict",
        "model=models:/bloodcell-demo@champion",
        f"input={store.root / 'cells.npz'}",
        f"output={output}",
        f"tracking.uri={store.uri}",
    )
    assert_ok(proc)
    with output.open() as f:
        return list(csv.DictReader(f))


def test_predict_with_the_ensemble_gives_the_mean_of_its_members_models(store, predictions):
    import mlflow

    from bloodcell.serving.loading import load_model
    from bloodcell.serving.prediction import predict_arrays

    mlflow.set_tracking_uri(store.uri)
    images = np.load(store.root / "cells.npz")["images"]
    members = [predict_arrays(load_model(f"runs:/{m}/model"), images) for m in (store.a, store.b)]
    got = np.array([[float(row[f"p_{c}"]) for c in CLASS_NAMES] for row in predictions])
    assert np.allclose(got, np.mean(members, axis=0), atol=1e-5)


def test_ensemble_submission_runs_without_bloodcell(store, predictions, tmp_path):
    bundle = tmp_path / "submission.zip"
    proc = run_module(
        "bloodcell.submit",
        "model=models:/bloodcell-demo@champion",
        f"output={bundle}",
        f"tracking.uri={store.uri}",
    )
    assert_ok(proc)
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(tmp_path / "fresh")
    proc = run_bundle(tmp_path / "fresh", ids=store.root / "cells.npz")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bloodcell not importable" in proc.stdout
    assert np.load(tmp_path / "fresh" / "ids.npy").tolist() == [int(row["class_id"]) for row in predictions]


def test_greedy_ensemble_of_a_sweep_is_nested_calibrated_and_no_trial(store):
    from bloodcell.evaluation.calibration import apply_temperature
    from bloodcell.evaluation.candidates import sweep_top

    proc = run_module(
        "bloodcell.ensemble",
        f"sweep={store.sweep}",
        "top=2",
        "selection=greedy",
        "size=3",
        "test_tta=true",
        f"tracking.uri={store.uri}",
    )
    run = ensemble_run(store, proc)
    assert "with test-time augmentation: validation accuracy" in proc.stdout
    assert run.data.tags["mlflow.parentRunId"] == store.sweep and run.info.experiment_id == store.experiment
    members = run.data.tags["ensemble.member_runs"].split(",")
    weights = [int(w) for w in run.data.params["ensemble.weights"].strip("[]").split(",")]
    assert set(members) <= {store.a, store.b} and 1 <= sum(weights) <= 3
    assert run.data.params["ensemble.members"] == str(len(members))
    # the greedy average on validation is at least as good as the best member alone
    val = [stored(store, m, "val") for m in (store.a, store.b)]
    best_member = max(np.mean(p.predicted == p.labels) for p in val)
    assert run.data.metrics["final_val_accuracy"] >= best_member
    # its probabilities: the weighted mean of its members', through the temperature it fitted
    temperature = run.data.metrics["calibration/temperature"]
    average = sum(w * stored(store, m, "test").probabilities for m, w in zip(members, weights)) / sum(weights)
    mine = stored(store, run.info.run_id, "test").probabilities
    assert np.allclose(mine, apply_temperature(average, temperature), atol=1e-4)
    assert "calibration/test_ece_after" in run.data.metrics
    # test_tta=true: the logged model's mean over the 8 views of each image, as predict tta=true gives, on
    # the test split and on validation (which says whether to use it)
    from bloodcell.serving.loading import load_model
    from bloodcell.serving.prediction import predict_arrays
    from bloodcell.training.run_data import split_images

    model = load_model(f"runs:/{run.info.run_id}/model", tracking_uri=store.uri)
    for split, metric in (("test", "test_tta_accuracy"), ("val", "final_val_tta_accuracy")):
        kept = stored(store, run.info.run_id, split)
        tta = predict_arrays(model, split_images(run, split, kept.data_index), tta=True)
        assert run.data.metrics[metric] == pytest.approx(np.mean(tta.argmax(1) == kept.labels))
        assert {f"{metric}_ci_low", metric.replace("accuracy", "macro_f1")} <= set(run.data.metrics)
    # a later `compare sweep=` or `ensemble sweep=` sees the trials, not the ensemble
    assert {r.info.run_id for r in sweep_top(store.client, store.sweep, 5)} == {store.a, store.b}
