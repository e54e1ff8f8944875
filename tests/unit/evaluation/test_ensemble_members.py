"""bloodcell.ensemble without MLflow runs: which members it accepts, greedy selection, the averaging model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bloodcell.core.errors import UserError
from bloodcell.evaluation.candidates import Candidate
from bloodcell.evaluation.ensemble import build_ensemble, check_members, greedy_selection


def candidate(run_id: str, data: str = "d" * 64, split: str = "s" * 64, model: bool = True, seed: int = 42):
    tags = {"data_fingerprint": data, "split_fingerprint": split, "data_source": "demo"}
    if model:
        tags["model_uri"] = f"models:/m-{run_id}"
    run = SimpleNamespace(
        info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(tags=tags, params={"seed": str(seed)})
    )
    return Candidate(run_id, run, "members")


def test_members_of_one_data_set_and_split_are_accepted():
    check_members([candidate("a"), candidate("b"), candidate("c")])


@pytest.mark.parametrize(
    "other, fragment",
    [
        (candidate("b", data="e" * 64), "trained on different data (demo, fingerprint dddddddddddd vs demo"),
        (candidate("b", split="t" * 64, seed=7), "split differently (split seed 42 vs 7"),
        (candidate("b", model=False), "run b logged no model"),
    ],
)
def test_members_of_other_data_splits_or_without_a_model_are_refused_in_one_line(other, fragment):
    with pytest.raises(UserError, match=r"^[^\n]+$") as err:
        check_members([candidate("a"), other])
    assert fragment in str(err.value)


# Two classes, four validation images: A and B are each right on 3 (B with the lower log loss), C on 2;
# the average of A and B is right on all 4, every other pair on fewer.
LABELS = np.array([0, 0, 1, 1])
A = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.9, 0.1]])
B = np.array([[0.4, 0.6], [0.9, 0.1], [0.1, 0.9], [0.01, 0.99]])
C = np.array([[0.99, 0.01]] * 4)


def test_greedy_selection_adds_the_member_that_helps_the_average_most():
    assert greedy_selection([A, B, C], LABELS, size=1) == [0, 1, 0]  # accuracy tie: the lower log loss
    assert greedy_selection([A, B, C], LABELS, size=2) == [1, 1, 0]  # A + B: 4 of 4


def test_greedy_selection_keeps_the_best_ensemble_seen_and_picks_with_replacement():
    perfect = np.array([[0.8, 0.2], [0.8, 0.2], [0.2, 0.8], [0.2, 0.8]])
    # more picks of the perfect model do not change the average: the first (smallest) ensemble is kept
    assert greedy_selection([C, perfect], LABELS, size=4) == [0, 1]
    rng = np.random.default_rng(0)
    candidates = [rng.dirichlet(np.ones(8), size=40) for _ in range(5)]
    labels = rng.integers(0, 8, size=40)
    counts = greedy_selection(candidates, labels, size=7)
    assert 1 <= sum(counts) <= 7
    average = sum(c * p for c, p in zip(counts, candidates)) / sum(counts)
    singles = [np.mean(p.argmax(1) == labels) for p in candidates]
    assert np.mean(average.argmax(1) == labels) >= max(singles)
    with pytest.raises(UserError, match="size=0"):
        greedy_selection(candidates, labels, size=0)


def _member(resize_to: int | None, seed: int):
    import keras

    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Resizing(resize_to, resize_to, name="resize")(inputs) if resize_to else inputs
    x = keras.layers.Conv2D(4, 3, kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(
        8, activation="softmax", kernel_initializer=keras.initializers.GlorotUniform(seed)
    )(x)
    return keras.Model(inputs, outputs, name="bloodcell_small_cnn")  # the same name for both, as trained


def test_the_ensemble_model_averages_members_of_other_input_sizes_with_weights_and_reloads(tmp_path):
    import keras

    a, b = _member(None, 1), _member(48, 2)
    images = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    pa, pb = a.predict_on_batch(images), b.predict_on_batch(images)
    assert not np.allclose(pa, pb, atol=1e-3)
    ensemble = build_ensemble([a, b], [2, 1])
    assert ensemble.input_shape == (None, 32, 32, 3)
    expected = (2 * pa + pb) / 3
    assert np.allclose(ensemble.predict_on_batch(images), expected, atol=1e-6)
    ensemble.save(tmp_path / "ensemble.keras")  # what tracking.log_model and submit write
    loaded = keras.saving.load_model(tmp_path / "ensemble.keras", compile=False)
    assert np.allclose(loaded.predict_on_batch(images), expected, atol=1e-6)


def test_a_calibrated_ensemble_is_standard_layers_and_tempers_the_log_of_the_average(tmp_path):
    import keras

    from bloodcell.evaluation.calibration import apply_temperature, with_temperature

    a, b, c = _member(None, 1), _member(48, 2), _member(None, 3)
    images = np.random.default_rng(1).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    average = (a.predict_on_batch(images) + 3 * b.predict_on_batch(images) + c.predict_on_batch(images)) / 5
    calibrated = with_temperature(build_ensemble([a, b, c], [1, 3, 1]), 2.5)
    calibrated.save(tmp_path / "calibrated.keras")
    loaded = keras.saving.load_model(tmp_path / "calibrated.keras", compile=False, safe_mode=True)
    modules = {type(layer).__module__.split(".")[0] for layer in loaded._flatten_layers()}
    assert modules == {"keras"}, modules
    np.testing.assert_allclose(loaded.predict_on_batch(images), apply_temperature(average, 2.5), atol=1e-6)


def test_members_that_take_images_of_other_shapes_are_refused():
    import keras

    inputs = keras.Input((48, 48, 3))
    other = keras.Model(inputs, keras.layers.Dense(8, activation="softmax")(keras.layers.Flatten()(inputs)))
    with pytest.raises(UserError, match="images of different shapes"):
        build_ensemble([_member(None, 1), other], [1, 1])
