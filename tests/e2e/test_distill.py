"""`python -m bloodcell.distill` end to end: two tiny runs averaged into an ensemble, which teaches a
student run on its soft labels; a teacher of other data or another split is refused.

The steps below share one copy of the session's tiny runs (tests/tiny_runs.py) and run in file order.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tests.helpers import (
    TINY,
    assert_ok,
    assert_user_error,
    logged_run_id,
    run_module,
)


@pytest.fixture(scope="module")
def store(tiny_runs, tmp_path_factory):
    """Two members (the session's tiny runs A and B, tests/tiny_runs.py: B resizes to 48 px inside the
    model, so that they differ) and their ensemble, on a copy of their store. The students go to the
    quickstart experiment."""
    import mlflow

    root = tmp_path_factory.mktemp("distill")
    uri = tiny_runs.copy(root)
    client = mlflow.MlflowClient(uri)
    members = [tiny_runs.a, tiny_runs.b]  # A first: the plain run whose layers a student has
    proc = run_module("bloodcell.ensemble", f"runs=[{','.join(members)}]", f"tracking.uri={uri}")
    assert_ok(proc)
    teacher = client.get_run(logged_run_id(proc))
    experiment = tiny_runs.quickstart_experiment
    return SimpleNamespace(
        root=root, uri=uri, client=client, experiment=experiment, members=members, teacher=teacher
    )


def distill_runs(store) -> list:
    return store.client.search_runs([store.experiment], "tags.`distill.teacher_run` != ''")


@pytest.fixture(scope="module")
def student(store):
    proc = run_module(
        "bloodcell.distill",
        f"teacher={store.teacher.info.run_id}",
        *TINY,
        "distill.alpha=0.3",
        "distill.temperature=3.0",
        f"tracking.uri={store.uri}",
    )
    assert_ok(proc)
    [run] = distill_runs(store)
    return run


def test_student_is_an_ordinary_run_that_names_its_teacher(store, student):
    teacher = store.teacher
    tags, params, metrics = student.data.tags, student.data.params, student.data.metrics
    assert student.info.status == "FINISHED"
    assert tags["distill.teacher"] == tags["distill.teacher_run"] == teacher.info.run_id
    assert tags["distill.teacher_model_uri"] == teacher.data.tags["model_uri"]
    assert tags["distill.teacher_split"] == "same"
    assert float(params["distill.alpha"]) == 0.3 and float(params["distill.temperature"]) == 3.0
    assert params["teacher"] == teacher.info.run_id
    assert metrics["distill/teacher_test_accuracy"] == teacher.data.metrics["test_accuracy"]
    assert metrics["distill/teacher_test_macro_f1"] == teacher.data.metrics["test_macro_f1"]
    assert 0 <= metrics["distill/teacher_train_accuracy"] <= 1
    # a training run's records: both phases, calibration, the same data and split as its teacher
    assert {"test_accuracy", "best_val_accuracy", "calibration/temperature", "time/seconds_targets"} <= set(
        metrics
    )
    assert store.client.get_metric_history(student.info.run_id, "val_accuracy")[-1].step == 1
    for key in ("data_fingerprint", "split_fingerprint"):
        assert tags[key] == teacher.data.tags[key]


def test_students_model_loads_and_predicts_with_a_plain_runs_layers(store, student):
    import mlflow

    from bloodcell.data import make_demo_set
    from bloodcell.serving.loading import load_model
    from bloodcell.serving.prediction import predict_arrays

    mlflow.set_tracking_uri(store.uri)
    model = load_model(student.data.tags["model_uri"])
    member = load_model(f"runs:/{store.members[0]}/model")
    # no layer a plain run's model lacks: the teacher is not part of it
    assert [type(layer).__name__ for layer in model.layers] == [
        type(layer).__name__ for layer in member.layers
    ]
    images, _ = make_demo_set(per_class=2, image_size=32, seed=3)
    probabilities = predict_arrays(model, images)
    assert probabilities.shape == (16, 8)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_the_calibrated_ensemble_and_the_student_load_in_a_fresh_python_without_bloodcell(store, student):
    """Both are plain Keras (issue 27): mlflow.pyfunc and mlflow.keras load them, safe mode on, in a process
    that cannot import bloodcell, and they give the probabilities their runs stored."""
    from bloodcell.evaluation.stored_predictions import stored_predictions
    from bloodcell.training.run_data import split_images
    from tests.plain_mlflow import assert_plain_keras, fresh_load

    teacher, runs = store.teacher, [store.teacher.info.run_id, student.info.run_id]
    assert teacher.data.metrics["calibration/temperature"] > 0
    stored = [stored_predictions(store.client, run_id, "test") for run_id in runs]
    images = split_images(teacher, "test", stored[0].data_index)
    np.testing.assert_array_equal(stored[1].data_index, stored[0].data_index)  # one split
    uris = [f"runs:/{run_id}/model" for run_id in runs]
    loaded = fresh_load(uris, images, store.uri, store.root / "fresh")
    for uri, predictions in zip(uris, stored):
        assert_plain_keras(loaded[uri])
        for way in ("pyfunc", "keras"):
            np.testing.assert_allclose(loaded[uri][way], predictions.probabilities, atol=1e-5)
        difference = np.abs(loaded[uri]["keras"] - predictions.probabilities).max()
        print(f"{uri}: max |fresh - stored| {difference:.2e}")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.per_class=13", "other data than the student"),
        ("data.split_seed=7", "split differently (its split seed 42"),
    ],
)
def test_a_teacher_of_other_data_or_another_split_is_refused_before_any_run(
    store, student, override, fragment
):
    proc = run_module(
        "bloodcell.distill",
        f"teacher={store.teacher.info.run_id}",
        *TINY,
        override,
        f"tracking.uri={store.uri}",
    )
    assert_user_error(proc, fragment, "test images", "distill.allow_different=true")
    assert len(distill_runs(store)) == 1  # the student's only


def test_help_names_the_teacher_and_the_training_groups():
    proc = run_module("bloodcell.distill", "--help")
    assert_ok(proc)
    assert "teacher=" in proc.stdout and "backbone:" in proc.stdout and "distill:" in proc.stdout
