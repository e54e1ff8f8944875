"""Temperature scaling, expected calibration error, the TemperatureScaling layer, and the accuracy/coverage
figures of abstention, on constructed predictions whose calibration is known."""

from __future__ import annotations

import numpy as np
import pytest

from bloodcell.evaluation.abstention import (
    abstention_metrics,
    accuracy_coverage,
    accuracy_coverage_figure,
    coverage_at_accuracy,
    review_mask,
    review_summary,
)
from bloodcell.evaluation.calibration import (
    apply_temperature,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    reliability_figure,
    with_temperature,
)

CLASSES = 8


def calibrated_set(n: int = 6000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from random logits, and labels drawn from exactly those probabilities: perfectly
    calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (n, CLASSES))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(CLASSES, p=p) for p in probabilities])
    return probabilities, labels


def test_ece_of_a_perfectly_calibrated_set_is_near_zero_and_of_a_sharpened_one_is_not():
    probabilities, labels = calibrated_set()
    assert expected_calibration_error(probabilities, labels) < 0.02
    # dividing the logits by 0.4 makes the same model over-confident: the labels stay, confidence rises
    sharpened = apply_temperature(probabilities, 0.4)
    assert (sharpened.argmax(1) == probabilities.argmax(1)).all()
    assert expected_calibration_error(sharpened, labels) > 0.1


def test_ece_by_hand_on_two_bins():
    # two images at 0.9 (one right), two at 0.6 (both right): |0.5-0.9| and |1.0-0.6|, half the images each
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    assert expected_calibration_error(probabilities, labels, bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_temperature_scaling_of_an_over_confident_set_finds_the_temperature_and_lowers_ece():
    probabilities, labels = calibrated_set(seed=1)
    val, test = slice(0, 3000), slice(3000, None)
    over_confident = apply_temperature(probabilities, 0.4)
    temperature = fit_temperature(over_confident[val], labels[val])
    assert temperature > 1.0
    # the sharpening undone: T = 1 / 0.4 up to the sampling noise of 3000 labels
    assert temperature == pytest.approx(2.5, rel=0.15)
    calibrated = apply_temperature(over_confident[test], temperature)
    before = expected_calibration_error(over_confident[test], labels[test])
    after = expected_calibration_error(calibrated, labels[test])
    assert after < before / 3 and after < 0.03
    np.testing.assert_array_equal(calibrated.argmax(1), over_confident[test].argmax(1))
    metrics = calibration_metrics(
        temperature,
        {"test": labels[test]},
        {"test": over_confident[test]},
        {"test": calibrated},
    )
    assert metrics == {
        "calibration/temperature": temperature,
        "calibration/test_ece_before": pytest.approx(before),
        "calibration/test_ece_after": pytest.approx(after),
    }
    fig = reliability_figure(over_confident[test], calibrated, labels[test], temperature)
    assert len(fig.axes) == 2 and "ECE" in fig.axes[0].get_legend().get_texts()[1].get_text()


def test_an_under_confident_set_gets_a_temperature_below_one():
    probabilities, labels = calibrated_set(n=3000, seed=2)
    assert fit_temperature(apply_temperature(probabilities, 2.0), labels) < 1.0


def _tiny_model(separate_softmax: bool = False):
    import keras

    inputs = keras.Input((4, 4, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(keras.layers.Flatten()(inputs))
    if separate_softmax:
        outputs = keras.layers.Activation("softmax")(keras.layers.Dense(CLASSES)(x))
    else:
        outputs = keras.layers.Dense(CLASSES, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="tiny")


@pytest.mark.parametrize("separate_softmax", [False, True])
def test_with_temperature_is_plain_keras_loads_in_safe_mode_and_equals_the_numpy_formula(
    tmp_path, separate_softmax
):
    import keras

    model = _tiny_model(separate_softmax)
    images = np.random.default_rng(0).uniform(0, 255, (6, 4, 4, 3)).astype(np.float32)
    plain = model.predict(images, verbose=0)

    calibrated = with_temperature(model, 1.7)
    np.testing.assert_allclose(model.predict(images, verbose=0), plain)  # the original keeps its weights
    path = tmp_path / "calibrated.keras"
    calibrated.save(path)
    # standard layers only: loads without any custom object registered for it
    loaded = keras.saving.load_model(path, compile=False, safe_mode=True, custom_objects={})
    assert {type(layer).__module__.split(".")[0] for layer in loaded.layers} == {"keras"}
    if not separate_softmax:  # the temperature folded into the last Dense layer, same name and activation
        assert loaded.layers[-1].name == "probabilities"
        assert loaded.layers[-1].activation.__name__ == "softmax"
    out = loaded.predict(images, verbose=0)
    np.testing.assert_allclose(out, apply_temperature(plain, 1.7), atol=1e-6)
    np.testing.assert_array_equal(out.argmax(1), plain.argmax(1))
    # a Sequential model (here holding the functional one) works alike
    sequential = with_temperature(keras.Sequential([keras.Input((4, 4, 3)), model]), 1.7)
    np.testing.assert_allclose(sequential.predict(images, verbose=0), out, atol=1e-6)


def test_an_older_model_with_the_temperature_layer_is_folded_when_calibrated_again_or_averaged():
    import keras

    from bloodcell.evaluation.calibration import TemperatureScaling, log_probabilities

    model = _tiny_model()
    images = np.random.default_rng(1).uniform(0, 255, (6, 4, 4, 3)).astype(np.float32)
    plain = model.predict(images, verbose=0)
    old = keras.Model(model.inputs, TemperatureScaling(2.0)(model.outputs[0]))  # as logged before issue 27
    again = with_temperature(old, 1.5)
    assert not any(isinstance(layer, TemperatureScaling) for layer in again.layers)
    np.testing.assert_allclose(again.predict(images, verbose=0), apply_temperature(plain, 3.0), atol=1e-6)
    logs = log_probabilities(old).predict(images, verbose=0)
    np.testing.assert_allclose(np.exp(logs), apply_temperature(plain, 2.0), atol=1e-6)
    with pytest.raises(ValueError, match="does not end with a softmax"):
        with_temperature(keras.Model(model.inputs, keras.layers.Dense(CLASSES)(model.inputs[0])), 2.0)


def test_accuracy_coverage_on_a_constructed_case():
    # top probabilities 0.95 .. 0.7 (class 0), most confident first; right, right, wrong, right, wrong, wrong
    top = np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7])
    probabilities = np.stack([top, 1 - top], axis=1)
    labels = np.array([0, 0, 1, 0, 1, 1])
    curve = accuracy_coverage(probabilities, labels)
    np.testing.assert_allclose(curve.coverage, np.arange(1, 7) / 6)
    np.testing.assert_allclose(curve.accuracy, [1, 1, 2 / 3, 3 / 4, 3 / 5, 3 / 6])
    np.testing.assert_allclose(curve.thresholds, top)
    assert coverage_at_accuracy(curve, 0.99) == (pytest.approx(2 / 6), pytest.approx(0.9))
    assert coverage_at_accuracy(curve, 0.75) == (pytest.approx(4 / 6), pytest.approx(0.8))
    metrics = abstention_metrics(probabilities, labels)
    assert metrics["abstention/coverage_at_99_accuracy"] == pytest.approx(2 / 6)
    assert metrics["abstention/coverage_at_95_accuracy"] == pytest.approx(2 / 6)
    assert metrics["abstention/point_threshold_at_99_accuracy"] == pytest.approx(0.9)
    fig = accuracy_coverage_figure(probabilities, labels)
    assert "33.3% kept" in " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())


def test_equal_top_probabilities_are_kept_or_dropped_together():
    # the two 0.9s: one right, one wrong; a threshold cannot keep just the right one
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]])
    curve = accuracy_coverage(probabilities, np.array([0, 1, 0]))
    np.testing.assert_allclose(curve.coverage, [2 / 3, 1.0])
    coverage, threshold = coverage_at_accuracy(curve, 0.99)
    assert coverage == 0.0 and np.isnan(threshold)


def test_review_marks_images_below_the_threshold_and_counts_them():
    probabilities = np.array([[0.95, 0.05], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    review = review_mask(probabilities, 0.9)
    assert review.tolist() == [False, True, False, True]  # 0.9 itself is not below 0.9
    assert review_summary(review, 0.9) == "2 of 4 images (50.0%) below 0.9: marked review"


def test_predict_table_carries_the_review_column_in_csv_and_npy(tmp_path):
    import csv

    from bloodcell.serving.prediction import write_predictions

    probabilities = np.eye(CLASSES, dtype=np.float32)[[0, 1, 2]] * 0.6 + 0.05
    probabilities[1] = np.full(CLASSES, 1 / CLASSES)
    review = review_mask(probabilities, 0.5)
    write_predictions(tmp_path / "p.csv", probabilities, ["a", "b", "c"], review=review)
    with (tmp_path / "p.csv").open() as f:
        assert [row["review"] for row in csv.DictReader(f)] == ["false", "true", "false"]
    write_predictions(tmp_path / "p.npy", probabilities, ["a", "b", "c"], review=review)
    assert np.load(tmp_path / "p.npy")["review"].tolist() == [False, True, False]
    write_predictions(tmp_path / "plain.npy", probabilities, ["a", "b", "c"])
    assert "review" not in np.load(tmp_path / "plain.npy").dtype.names


@pytest.mark.parametrize("value", [1.5, 0, -0.1, "high", True])
def test_predict_refuses_a_review_threshold_outside_0_1_before_loading_anything(tmp_path, value):
    from omegaconf import OmegaConf

    from bloodcell.core.errors import UserError
    from bloodcell.predict import predict

    cfg = OmegaConf.create(
        {
            "model": "models:/never-looked-up@champion",
            "input": str(tmp_path / "absent.npz"),
            "output": str(tmp_path / "p.csv"),
            "batch_size": 8,
            "tta": False,
            "overwrite": False,
            "review_below": value,
        }
    )
    with pytest.raises(UserError, match="review_below=.* must be a top probability in \\(0, 1\\]"):
        predict(cfg)
