"""`bloodcell.promote`, `bloodcell.predict` and `bloodcell.submit` end to end, as a user runs them.

Two tiny runs of the session's store (tests/tiny_runs.py), on a copy of it, each in its own experiment:
run A, the quickstart run, alone in ``quickstart``; run B, the 48-px one, in ``members`` as a child of the
hand-made sweep parent (its sibling logs no ``score``, so it is never ranked). Which run is "better" is made
deterministic with a metric the test logs itself (``score``: A 0.8, B 0.4), since 1-epoch accuracies on 15
images tie.
The registry steps below depend on each other and run in file order.
"""

from __future__ import annotations

import ast
import csv
import re
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from bloodcell import CLASS_NAMES
from tests.helpers import assert_ok, assert_user_error, run_bundle, run_module

SCORE = {"A": 0.8, "B": 0.4}


@pytest.fixture(scope="module")
def store(tiny_runs, tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("registry")
    uri = tiny_runs.copy(root)
    client = mlflow.MlflowClient(uri)
    client.create_experiment("empty", artifact_location=(root / "artifacts").as_uri())
    ids = {"A": tiny_runs.quickstart, "B": tiny_runs.b}
    for key, experiment in (("A", "quickstart"), ("B", "members")):
        exp = client.get_experiment_by_name(experiment)
        assert ids[key] in {
            r.info.run_id for r in client.search_runs([exp.experiment_id], "tags.model_uri != ''")
        }
        client.log_metric(ids[key], "score", SCORE[key])  # B's sibling A (no score) is never ranked
    assert client.get_run(ids["B"]).data.tags["mlflow.parentRunId"] == tiny_runs.sweep
    from bloodcell.data import make_demo_set

    images, labels = make_demo_set(per_class=2, image_size=32, seed=3)
    np.savez(root / "cells.npz", images=images, labels=labels)
    np.savez(root / "cells48.npz", images=make_demo_set(per_class=1, image_size=48, seed=3)[0])
    return SimpleNamespace(root=root, uri=uri, client=client, run=ids, sweep=tiny_runs.sweep, images=images)


def promote(store, *args):
    # the quickstart runs would register as `bloodcell-demo` (their model_name); these tests are about the
    # registry, so they file them under the real model's name (tests/e2e/test_winners.py checks the demo's)
    return run_module("bloodcell.promote", f"tracking.uri={store.uri}", "model_name=bloodcell", *args)


def versions(store) -> dict[str, str]:
    """version -> run id of every version of `bloodcell`."""
    return {str(v.version): v.run_id for v in store.client.search_model_versions("name = 'bloodcell'")}


def champion(store) -> str | None:
    from bloodcell.serving.registry import alias_holder

    holder = alias_holder(store.client, "bloodcell", "champion")
    return str(holder.version) if holder else None


# ------------------------------------------------------------------------------------------- promote


def test_promote_registers_best_run_with_provenance_and_sets_alias(store):
    proc = promote(store, "experiment=quickstart", "metric=score")
    assert_ok(proc)
    assert versions(store) == {"1": store.run["A"]}
    assert champion(store) == "1"
    assert "bloodcell@champion -> version 1" in proc.stdout
    version = store.client.get_model_version("bloodcell", "1")
    run = store.client.get_run(store.run["A"])
    assert version.tags["run_id"] == store.run["A"]
    assert float(version.tags["metric.score"]) == pytest.approx(0.8)
    assert float(version.tags["metric.best_val_accuracy"]) == pytest.approx(
        run.data.metrics["best_val_accuracy"]
    )
    assert version.tags["data_fingerprint"] == run.data.tags["data_fingerprint"]
    assert version.tags["git_commit"] == run.data.tags["git_commit"]
    assert "backbone:" in version.tags["config"] and "small_cnn" in version.tags["config"]
    assert store.run["A"] in version.description and "score=0.8000" in version.description
    assert version.source == run.data.tags["model_uri"]


def test_worse_run_is_registered_but_does_not_take_the_alias(store):
    proc = promote(store, "experiment=members", "metric=score", f"sweep={store.sweep}", "gate=metric")
    assert_ok(proc)
    assert versions(store) == {"1": store.run["A"], "2": store.run["B"]}
    assert champion(store) == "1"
    assert "unchanged" in proc.stdout and "does not beat" in proc.stdout


def test_promoting_the_same_run_twice_makes_no_second_version(store):
    proc = promote(store, "experiment=members", "metric=score")
    assert_ok(proc)
    assert len(versions(store)) == 2
    assert "is already version 2" in proc.stdout


def test_force_moves_the_alias_and_a_better_run_takes_it_back(store):
    assert_ok(promote(store, "experiment=members", "metric=score", "force=true"))
    assert champion(store) == "2"
    proc = promote(store, "experiment=quickstart", "metric=score", "gate=metric")
    assert_ok(proc)
    assert champion(store) == "1" and len(versions(store)) == 2
    assert "beats holder version 2" in proc.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["experiment=nope"], "experiment 'nope' not found"),
        (["experiment=empty"], "no FINISHED runs"),
    ],
)
def test_promote_bad_input_is_one_line_and_leaves_the_registry_alone(store, args, fragment):
    before = (versions(store), champion(store))
    assert_user_error(promote(store, *args), fragment)
    assert (versions(store), champion(store)) == before


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"metric": "nope"}, "metric 'nope'"),
        ({"sweep": "0123abc"}, "not a run id"),
        ({"sweep": "{run_a}"}, "no FINISHED trial runs"),  # a run, but no sweep's parent
        ({"experiment": "members", "sweep": "{run_a}"}, "belongs to experiment 'quickstart'"),
        ({"alias": "latest"}, "reserved"),
        ({"model_name": "a/b"}, "not a valid registered model name"),
    ],
)
def test_promote_library_rejects_bad_input_before_touching_the_registry(store, kwargs, fragment):
    from bloodcell.core.cli import compose
    from bloodcell.core.errors import UserError
    from bloodcell.serving.promotion import promote as promote_run
    from bloodcell.serving.settings import promote_settings

    kwargs = {"experiment": "quickstart", **{k: v.format(run_a=store.run["A"]) for k, v in kwargs.items()}}
    overrides = [f"tracking.{k}={v}" if k == "experiment" else f"{k}={v}" for k, v in kwargs.items()]
    before = (versions(store), champion(store))
    with pytest.raises(UserError, match=re.escape(fragment)):
        promote_run(store.client, promote_settings(compose(overrides, "promote")))
    assert (versions(store), champion(store)) == before


def test_best_run_ranks_by_metric_direction_and_skips_runs_without_a_model():
    from bloodcell.core.errors import UserError
    from bloodcell.serving.registry import best_run

    def run(name, start, model=True, **metrics):
        return SimpleNamespace(
            info=SimpleNamespace(run_id=name, start_time=start),
            data=SimpleNamespace(metrics=metrics, tags={"model_uri": "models:/m-1"} if model else {}),
        )

    runs = [
        run("a", 1, val_accuracy=0.5, val_loss=0.9),
        run("b", 2, val_accuracy=0.7, val_loss=0.4),
        run("c", 3, val_accuracy=0.7, val_loss=0.2),
        run("d", 4, model=False, val_accuracy=0.99),
    ]
    assert best_run(runs, "val_accuracy", "x").info.run_id == "b"  # tie: the earlier run
    assert best_run(runs, "val_loss", "x").info.run_id == "c"  # losses rank lower-is-better
    with pytest.raises(UserError, match="no FINISHED runs"):
        best_run([], "val_accuracy", "x")
    with pytest.raises(UserError, match="logged a model"):
        best_run([runs[3]], "val_accuracy", "x")


# ------------------------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def predictions(store):
    output = store.root / "pred.csv"
    proc = run_module(
        "bloodcell.predict",
        "model=models:/bloodcell@champion",
        f"input={store.root / 'cells.npz'}",
        f"output={output}",
        "batch_size=5",
        f"tracking.uri={store.uri}",
    )
    assert_ok(proc)
    with output.open() as f:
        return list(csv.DictReader(f))


def test_predict_writes_one_row_per_image_with_probabilities_summing_to_one(store, predictions):
    assert len(predictions) == len(store.images)
    for row in predictions:
        probs = np.array([float(row[f"p_{c}"]) for c in CLASS_NAMES])
        assert probs.sum() == pytest.approx(1.0, abs=1e-4)
        assert int(row["class_id"]) == probs.argmax() and row["class_name"] == CLASS_NAMES[probs.argmax()]
    assert [row["image"] for row in predictions] == [str(i) for i in range(len(store.images))]


@pytest.mark.parametrize(
    "model, fragment",
    [
        ("models:/nope@champion", "registered model 'nope' not found"),
        ("models:/bloodcell@gold", "no alias 'gold'"),
    ],
)
def test_predict_unknown_model_or_alias_is_one_line(store, model, fragment):
    proc = run_module(
        "bloodcell.predict",
        f"model={model}",
        f"input={store.root / 'cells.npz'}",
        f"output={store.root / 'never.csv'}",
        f"tracking.uri={store.uri}",
    )
    assert_user_error(proc, fragment)
    assert not (store.root / "never.csv").exists()


@pytest.mark.parametrize(
    "model, fragment",
    [
        ("models:/bloodcell/99", "no version '99'"),
        ("models:/m-0000", "logged model m-0000 not found"),
        ("runs:/0123abc/model", "run '0123abc' not found"),
        ("no/such/model.keras", "neither an existing file"),
    ],
)
def test_resolve_model_uri_names_what_is_missing(store, model, fragment):
    from bloodcell.core.errors import UserError
    from bloodcell.serving.loading import resolve_model_uri

    with pytest.raises(UserError, match=re.escape(fragment)):
        resolve_model_uri(model, store.client)
    assert resolve_model_uri("models:/bloodcell@champion", store.client) == "models:/bloodcell@champion"


@pytest.fixture(scope="module")
def predictions48(store):
    """predict on 48x48 images for the 32-px model: resized as the submission bundle resizes (issue 16)."""
    output = store.root / "pred48.csv"
    proc = run_module(
        "bloodcell.predict",
        "model=models:/bloodcell@champion",
        f"input={store.root / 'cells48.npz'}",
        f"output={output}",
        f"tracking.uri={store.uri}",
    )
    assert_ok(proc)
    assert "images are 48x48, the model takes 32x32: resized to it" in proc.stdout
    with output.open() as f:
        return list(csv.DictReader(f))


def test_predict_resizes_images_of_another_size_and_refuses_non_rgb(store, predictions48, tmp_path):
    assert len(predictions48) == len(CLASS_NAMES)  # one 48x48 cell per class
    np.savez(tmp_path / "gray.npz", images=np.zeros((3, 32, 32), np.uint8))
    proc = run_module(
        "bloodcell.predict",
        "model=models:/bloodcell@champion",
        f"input={tmp_path / 'gray.npz'}",
        f"output={tmp_path / 'p.csv'}",
        f"tracking.uri={store.uri}",
    )
    assert_user_error(proc, "(N, H, W, 3)")


def top_and_a_threshold_between(predictions) -> tuple[np.ndarray, float]:
    """The champion's top probability per image (from the plain run's CSV rows) and a threshold in the middle
    of their widest gap: far from every image's value, so it splits them without ties."""
    top = np.array([max(float(row[f"p_{c}"]) for c in CLASS_NAMES) for row in predictions])
    ranked = np.unique(top)
    cut = int(np.argmax(np.diff(ranked)))
    return top, round(float(ranked[cut] + ranked[cut + 1]) / 2, 6)


def test_predict_review_below_marks_and_counts_the_images_under_the_threshold(store, predictions, tmp_path):
    """review_below: a threshold between two of the champion's top probabilities (from the plain run)
    splits the images; the column and the printed count say which and how many."""
    top, threshold = top_and_a_threshold_between(predictions)
    expected = top < threshold
    assert 0 < expected.sum() < len(top)
    output = tmp_path / "review.csv"
    proc = run_module(
        "bloodcell.predict",
        "model=models:/bloodcell@champion",
        f"input={store.root / 'cells.npz'}",
        f"output={output}",
        f"review_below={threshold}",
        f"tracking.uri={store.uri}",
    )
    assert_ok(proc)
    with output.open() as f:
        rows = list(csv.DictReader(f))
    assert [row["review"] for row in rows] == ["true" if r else "false" for r in expected]
    count, total = int(expected.sum()), len(expected)
    assert (
        f"{count} of {total} images ({count / total:.1%}) below {threshold:g}: marked review" in proc.stdout
    )


def test_predict_review_accuracy_uses_the_threshold_the_champions_run_certified(store, predictions, tmp_path):
    """review_accuracy=0.99: the threshold is the one the champion's run logged for 99% (its 15 validation
    cells certify none, so the test logs one, as a run with enough cells would), the column marks the
    images below it, and the promise is printed with its confidence and where the threshold came from."""
    run_id = store.client.get_model_version_by_alias("bloodcell", "champion").run_id
    logged = store.client.get_run(run_id).data.metrics
    assert logged["abstention/confidence"] == 0.9  # every run logs the guarantee, found or not
    assert "abstention/threshold_at_99_accuracy" in logged
    top, threshold = top_and_a_threshold_between(predictions)
    store.client.log_metric(run_id, "abstention/threshold_at_99_accuracy", threshold)
    store.client.log_metric(run_id, "abstention/calibration_images", 2049)
    output = tmp_path / "review.csv"
    proc = run_module(
        "bloodcell.predict",
        "model=models:/bloodcell@champion",
        f"input={store.root / 'cells.npz'}",
        f"output={output}",
        "review_accuracy=0.99",
        f"tracking.uri={store.uri}",
    )
    assert_ok(proc)
    with output.open() as f:
        rows = list(csv.DictReader(f))
    assert [row["review"] for row in rows] == ["true" if t < threshold else "false" for t in top]
    assert (
        "review: kept cells >= 99% correct with 90% confidence (any batch of >= 1000 kept cells): "
        f"top probability >= {threshold:.4f}, certified on 2049 validation cells of run {run_id}"
        in proc.stdout
    )
    count = int((top < threshold).sum())
    assert f"{count} of {len(top)} images ({count / len(top):.1%}) below {threshold:g}" in proc.stdout


def test_predict_does_not_overwrite_unless_asked(store, predictions, tmp_path):
    existing = tmp_path / "p.csv"
    existing.write_text("keep me")
    proc = run_module(
        "bloodcell.predict",
        "model=models:/bloodcell@champion",
        f"input={store.root / 'cells.npz'}",
        f"output={existing}",
        f"tracking.uri={store.uri}",
    )
    assert_user_error(proc, "overwrite=true")
    assert existing.read_text() == "keep me"


class _MeanColourModel:
    """Stands in for a Keras model: probabilities from each image's mean colour, so invariant under flips
    and rotations; counts the views it is shown."""

    def __init__(self):
        self.views = 0

    def predict_on_batch(self, batch):
        self.views += 1
        logits = np.concatenate([batch.mean(axis=(1, 2)), np.zeros((len(batch), 5))], axis=1) / 100
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)


def test_predict_arrays_batches_and_averages_over_flips_and_rotations():
    from bloodcell.data import make_demo_set
    from bloodcell.serving.prediction import predict_arrays

    images = make_demo_set(per_class=2, image_size=32, seed=3)[0]
    model = _MeanColourModel()
    plain = predict_arrays(model, images, batch_size=5)
    assert model.views == 4 and plain.shape == (16, 8)  # 16 images in batches of 5
    model.views = 0
    averaged = predict_arrays(model, images, batch_size=16, tta=True)
    assert model.views == 8 and np.allclose(averaged, plain, atol=1e-6)
    model.views = 0
    predict_arrays(model, images[:, :, :20], batch_size=16, tta=True)
    assert model.views == 4  # not square: flips only


# ------------------------------------------------------------------------------------------- submit


def test_submission_predicts_like_predict_without_bloodcell(store, predictions, predictions48, tmp_path):
    bundle = tmp_path / "submission.zip"
    proc = run_module(
        "bloodcell.submit",
        "model=models:/bloodcell@champion",
        f"output={bundle}",
        f"tracking.uri={store.uri}",
    )
    assert_ok(proc)
    assert_user_error(
        run_module("bloodcell.submit", f"output={bundle}", f"tracking.uri={store.uri}"), "overwrite=true"
    )
    unpacked = tmp_path / "fresh"
    with zipfile.ZipFile(bundle) as zf:
        assert sorted(zf.namelist()) == ["model.keras", "model.py"]
        zf.extractall(unpacked)
    imports = set()
    for node in ast.walk(ast.parse((unpacked / "model.py").read_text())):
        if isinstance(node, ast.Import):
            imports |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imports.add(node.module.split(".")[0])
    assert imports <= {"os", "numpy", "keras", "tensorflow"}, imports
    # the champion is calibrated (trainer.calibrate), its temperature folded into its last Dense layer: no
    # custom layer (issue 27; model.py still defines the older models' TemperatureScaling)
    with zipfile.ZipFile(unpacked / "model.keras") as keras_zip:
        assert b'"TemperatureScaling"' not in keras_zip.read("config.json")

    proc = run_bundle(
        unpacked, ids=store.root / "cells.npz", ids96="zeros96", ids48=store.root / "cells48.npz"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bloodcell not importable" in proc.stdout
    ids = np.load(unpacked / "ids.npy")
    assert ids.tolist() == [int(row["class_id"]) for row in predictions]
    ids96 = np.load(unpacked / "ids96.npy")
    assert ids96.shape == (3,) and ((ids96 >= 0) & (ids96 < 8)).all()
    # one rule for images of another size: the bundle and predict resize alike
    assert np.load(unpacked / "ids48.npy").tolist() == [int(row["class_id"]) for row in predictions48]


def test_submit_unknown_model_is_one_line(store, tmp_path):
    proc = run_module(
        "bloodcell.submit",
        "model=models:/bloodcell@nope",
        f"output={tmp_path / 's.zip'}",
        f"tracking.uri={store.uri}",
    )
    assert_user_error(proc, "no alias 'nope'")
    assert not (tmp_path / "s.zip").exists()
