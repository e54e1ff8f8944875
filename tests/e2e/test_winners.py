"""Issue 15, "winners that are real, not noise", end to end: a real tiny run keeps its predictions and
intervals; `bloodcell.compare` and the champion gate of `bloodcell.promote` run as a user runs them.

One tiny run (the session's tiny quickstart run, tests/tiny_runs.py, on a copy of its store). The runs
compared or promoted against it are made by hand in the same store (its tags, config and logged model, with
predictions constructed so that the expected answer is known), since two 1-epoch models on 15 test images
never differ significantly.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import binomtest

from bloodcell import CLASS_NAMES, NUM_CLASSES
from bloodcell.evaluation import stats
from tests.helpers import TINY_HEAD_ONLY, assert_ok, assert_user_error, run_module


@pytest.fixture(scope="module")
def base(tiny_runs, tmp_path_factory):
    """The session's tiny quickstart run (tests/tiny_runs.py), alone in its experiment, on a copy of its
    store."""
    import mlflow

    root = tmp_path_factory.mktemp("winners")
    uri = tiny_runs.copy(root)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.run_id == tiny_runs.quickstart
    return SimpleNamespace(root=root, uri=uri, client=client, run=run)


def _stored(base, run_id: str, split: str):
    from bloodcell.evaluation.stored_predictions import stored_predictions

    found = stored_predictions(base.client, run_id, split)
    assert found is not None, (run_id, split)
    return found


def test_a_run_keeps_its_predictions_and_logs_intervals(base):
    import mlflow

    from bloodcell.core.cli import compose
    from bloodcell.data import load_arrays, split_arrays

    run = base.run
    cfg = compose(TINY_HEAD_ONLY)
    data = cfg.data
    splits = split_arrays(load_arrays(data), data.val_fraction, data.test_fraction, data.split_seed)
    assert run.data.tags["split_fingerprint"] == splits.fingerprint()
    assert run.data.params["model_name"] == "bloodcell-demo"  # the demo preset's own registered model
    metrics = run.data.metrics
    for split, prefix in (("test", "test_"), ("val", "final_val_")):
        stored = _stored(base, run.info.run_id, split)
        part = getattr(splits, split)
        assert stored.data_index.tolist() == splits.positions(split).tolist()
        assert stored.index.tolist() == list(range(len(part)))
        assert stored.labels.tolist() == part.labels.tolist()
        assert stored.probabilities.shape == (len(part), NUM_CLASSES)
        np.testing.assert_allclose(stored.probabilities.sum(axis=1), 1.0, atol=1e-4)
        # the logged figures are those of the stored predictions, the interval Wilson's (scipy)
        correct = int(np.sum(stored.predicted == stored.labels))
        assert metrics[f"{prefix}accuracy"] == pytest.approx(correct / len(part))
        ci = binomtest(correct, len(part)).proportion_ci(0.95, method="wilson")
        low, high = stats.interval_names(f"{prefix}accuracy")
        assert (metrics[low], metrics[high]) == pytest.approx((ci.low, ci.high))
        f1_low, f1_high = stats.interval_names(f"{prefix}macro_f1")
        assert metrics[f1_low] <= metrics[f"{prefix}macro_f1"] <= metrics[f1_high]
    report = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/classification_report.json"))
    for name in CLASS_NAMES:
        assert 0 <= report[name]["recall_ci_low"] <= report[name]["recall"] <= report[name]["recall_ci_high"]


# ---- runs made by hand, with known predictions -----------------------------------------------------------


def _hand_made(
    base,
    experiment: str,
    predicted: np.ndarray,
    labels: np.ndarray,
    data_index: np.ndarray,
    *,
    score: float = 0.5,
    tags: dict | None = None,
    model_uri: str | None = None,
    config: bool = False,
) -> str:
    """A FINISHED run with the base run's provenance tags, ``best_val_accuracy=score`` and test
    predictions ``predicted`` (one-hot) of the images ``data_index``."""
    client = base.client
    found = client.get_experiment_by_name(experiment)
    eid = found.experiment_id if found else client.create_experiment(experiment, str(base.root / "artifacts"))
    keep = ("data_fingerprint", "split_fingerprint", "data_source", "model_uri")
    run_tags = {k: base.run.data.tags[k] for k in keep} | (tags or {})
    if model_uri:
        run_tags["model_uri"] = model_uri
    run_id = client.create_run(eid, tags=run_tags).info.run_id
    client.log_param(run_id, "seed", base.run.data.params["seed"])
    client.log_param(run_id, "model_name", "bloodcell")
    client.log_metric(run_id, "best_val_accuracy", score)
    folder = base.root / run_id
    folder.mkdir()
    np.savez(
        folder / "test.npz",
        index=np.arange(len(labels)),
        data_index=data_index,
        labels=labels,
        probabilities=np.eye(NUM_CLASSES, dtype=np.float32)[predicted],
    )
    client.log_artifact(run_id, str(folder / "test.npz"), "predictions")
    if config:
        import mlflow

        (folder / "config.yaml").write_text(
            mlflow.artifacts.load_text(f"{base.run.info.artifact_uri}/config.yaml")
        )
        client.log_artifact(run_id, str(folder / "config.yaml"))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _wrong(labels: np.ndarray) -> np.ndarray:
    return (labels + 1) % NUM_CLASSES


@pytest.fixture(scope="module")
def pair(base):
    """Runs A and B on the base run's real test images: A misses the first 6, B gets all right."""
    test = _stored(base, base.run.info.run_id, "test")
    labels, index = test.labels, test.data_index
    a = labels.copy()
    a[:6] = _wrong(labels[:6])
    run_a = _hand_made(base, "handmade", a, labels, index, config=True)
    run_b = _hand_made(base, "handmade", labels, labels, index)
    return SimpleNamespace(a=run_a, b=run_b, labels=labels, index=index)


def test_compare_two_runs_gives_the_known_mcnemar_p_and_logs_it(base, pair):
    proc = run_module(
        "bloodcell.compare",
        f"runs=[{pair.a},{pair.b}]",
        f"tracking.uri={base.uri}",
        "tracking.experiment=cmp",
    )
    assert_ok(proc)
    expected = binomtest(0, 6, 0.5).pvalue  # 6 images only B gets right, none only A: 2 * 0.5**6
    assert expected == pytest.approx(0.03125)
    assert "McNemar exact p = 0.03125" in proc.stdout
    assert "accuracy [95% interval]" in proc.stdout and "recall per class" in proc.stdout
    client = base.client
    (logged,) = client.search_runs([client.get_experiment_by_name("cmp").experiment_id])
    assert logged.data.metrics["B_vs_A_mcnemar_p"] == pytest.approx(expected)
    assert logged.data.metrics["B_vs_A_only_B_right"] == 6 and logged.data.metrics["B_vs_A_only_A_right"] == 0
    n = len(pair.labels)
    assert logged.data.metrics["A_accuracy"] == pytest.approx((n - 6) / n)
    low, high = stats.interval_names("A_accuracy")
    assert (logged.data.metrics[low], logged.data.metrics[high]) == pytest.approx(stats.wilson(n - 6, n))
    plots = {a.path for a in client.list_artifacts(logged.info.run_id, "plots")}
    assert "plots/disagreements_B_vs_A.png" in plots  # the images, loaded again from A's config
    assert {"comparison.txt", "comparison.json"} <= {
        a.path for a in client.list_artifacts(logged.info.run_id)
    }


def test_compare_refuses_runs_of_other_data_or_other_splits_in_one_line(base, pair):
    other_data = _hand_made(
        base, "handmade", pair.labels, pair.labels, pair.index, tags={"data_fingerprint": "f" * 64}
    )
    proc = run_module("bloodcell.compare", f"runs=[{pair.a},{other_data}]", f"tracking.uri={base.uri}")
    assert_user_error(proc, "different data", "eval=")
    other_split = _hand_made(
        base, "handmade", pair.labels, pair.labels, pair.index, tags={"split_fingerprint": "e" * 64}
    )
    proc = run_module("bloodcell.compare", f"runs=[{pair.a},{other_split}]", f"tracking.uri={base.uri}")
    assert_user_error(proc, "split differently", "allow_different=true")
    # told, same-data runs are compared on the images both splits hold out
    proc = run_module(
        "bloodcell.compare", f"runs=[{pair.a},{other_split}]", "allow_different=true", "log=false",
        f"tracking.uri={base.uri}",
    )  # fmt: skip
    assert_ok(proc)
    assert "held out from all of them" in proc.stdout


# ---- the champion gate ---------------------------------------------------------------------------------


def _promote(base, *args: str):
    return run_module("bloodcell.promote", f"tracking.uri={base.uri}", *args)


def _version_tags(base, name: str, run_id: str) -> dict:
    (version,) = base.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return dict(version.tags)


def test_gate_refuses_better_overall_but_worse_on_one_class_and_accepts_a_clearly_better_one(base):
    from bloodcell.serving.registry import alias_holder

    labels = np.repeat(np.arange(NUM_CLASSES), 50)  # 400 images, 50 per class (made up, on one split)
    index = np.arange(len(labels))
    holder = labels.copy()
    holder[50:80] = _wrong(labels[50:80])  # 30 eosinophils missed
    worse_on_basophils = labels.copy()
    worse_on_basophils[:2] = _wrong(labels[:2])  # 2 errors in all, both basophils: -4 points on them
    clearly_better = labels.copy()
    clearly_better[50:52] = _wrong(labels[50:52])
    ids = {
        "holder": _hand_made(base, "gate-holder", holder, labels, index),
        "bad": _hand_made(base, "gate-bad", worse_on_basophils, labels, index),
        "good": _hand_made(base, "gate-good", clearly_better, labels, index),
    }
    assert_ok(_promote(base, "experiment=gate-holder"))  # registers as `bloodcell` (the runs' model_name)
    assert str(alias_holder(base.client, "bloodcell", "champion").version) == "1"

    proc = _promote(base, "experiment=gate-bad")
    assert_ok(proc)
    assert "bloodcell@champion unchanged" in proc.stdout and "basophil -4.0" in proc.stdout
    assert "holder right" in proc.stdout and "McNemar exact p" in proc.stdout  # the table is printed
    assert "experiment 'gate-holder'" in proc.stdout  # where the holder came from
    tags = _version_tags(base, "bloodcell", ids["bad"])
    assert (
        tags["gate.decision"] == "kept" and tags["gate"] == "mcnemar" and tags["gate.holder_version"] == "1"
    )
    assert json.loads(tags["gate.table"])["only_challenger_right"] == 30
    assert float(tags["gate.p_value"]) < 1e-6
    assert str(alias_holder(base.client, "bloodcell", "champion").version) == "1"

    proc = _promote(base, "experiment=gate-good")
    assert_ok(proc)
    assert "bloodcell@champion -> version 3" in proc.stdout, proc.stdout
    tags = _version_tags(base, "bloodcell", ids["good"])
    assert tags["gate.decision"] == "moved" and json.loads(tags["gate.table"])["only_challenger_right"] == 28

    # the old rule stays available: by best_val_accuracy (all 0.5 here) nothing beats the holder
    proc = _promote(base, "experiment=gate-bad", "gate=metric")
    assert_ok(proc)
    assert "does not beat holder version 3" in proc.stdout
    assert _version_tags(base, "bloodcell", ids["bad"])["gate"] == "metric"


def _logged_model(base, size: int) -> str:
    """A real Keras model taking size x size images, logged to a run of its own; its models:/ URI."""
    import keras
    import mlflow

    inputs = keras.Input((size, size, 3))
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(inputs)
    )
    mlflow.set_tracking_uri(base.uri)
    exp = base.client.get_experiment_by_name("models") or base.client.get_experiment(
        base.client.create_experiment("models", str(base.root / "artifacts"))
    )
    example = np.zeros((1, size, size, 3), np.float32)
    with mlflow.start_run(experiment_id=exp.experiment_id):
        info = mlflow.keras.log_model(
            keras.Model(inputs, outputs),
            name="model",
            signature=mlflow.models.infer_signature(example, np.zeros((1, NUM_CLASSES), np.float32)),
        )
    return str(info.model_uri)


def test_demo_models_register_apart_and_a_holder_that_cannot_take_the_images_loses(base):
    from bloodcell.serving.registry import alias_holder

    # the quickstart preset's runs register under their own name, never holding bloodcell@champion
    proc = _promote(base, "experiment=quickstart")
    assert_ok(proc)
    assert "of 'bloodcell-demo'" in proc.stdout and "bloodcell-demo@champion -> version 1" in proc.stdout
    # as before the split: the demo model (32x32, synthetic) made the holder of another name by hand ...
    assert_ok(_promote(base, "experiment=quickstart", "model_name=real"))
    test = _stored(base, base.run.info.run_id, "test")
    # ... and a challenger taking 48x48 images: the holder cannot even take them, and loses, with that reason
    challenger = _hand_made(
        base, "real48", test.labels, test.labels, test.data_index, model_uri=_logged_model(base, 48),
        tags={"data_fingerprint": "a" * 64, "split_fingerprint": "b" * 64, "data_source": "cells48.npz"},
    )  # fmt: skip
    proc = _promote(base, "experiment=real48", "model_name=real")
    assert_ok(proc)
    assert "real@champion -> version 2" in proc.stdout
    assert "takes 32x32 images and cannot take the challenger's 48x48 test images" in proc.stdout
    assert "experiment 'quickstart'" in proc.stdout and "data demo (synthetic" in proc.stdout
    assert str(alias_holder(base.client, "real", "champion").version) == "2"
    assert _version_tags(base, "real", challenger)["gate.decision"] == "moved"


def test_gate_with_eval_images_predicts_both_models(base, tmp_path):
    from bloodcell.data import make_demo_set

    assert_ok(_promote(base, "experiment=quickstart"))  # the demo model holds bloodcell-demo@champion
    images, labels = make_demo_set(per_class=3, image_size=32, seed=5)
    path = tmp_path / "eval.npz"
    np.savez(path, images=images, labels=labels)
    # the demo model against itself (another version of the same logged model): never better
    run_id = _hand_made(base, "same-model", labels, labels, np.arange(len(labels)))
    proc = _promote(base, "experiment=same-model", "model_name=bloodcell-demo", f"eval={path}")
    assert_ok(proc)
    assert f"eval={path} ({len(labels)} images)" in proc.stdout
    assert "McNemar exact p = 1" in proc.stdout and "unchanged: not better" in proc.stdout
    assert _version_tags(base, "bloodcell-demo", run_id)["gate.eval"] == str(path)
