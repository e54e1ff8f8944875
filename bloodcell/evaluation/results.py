"""A final model's result on a run's splits: the validation and test predictions, scored, calibrated by a
temperature fitted on validation when asked (`final_result`); what training and ensembles both report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras
    import numpy as np

    from bloodcell.data import Arrays, Splits
    from bloodcell.evaluation.metrics import Evaluation
log = logging.getLogger("bloodcell.train")


@dataclass
class SplitPredictions:
    """The final model's predictions on one split, and what they score."""

    arrays: Arrays
    data_index: np.ndarray  # positions in the data set the split was cut from (`Splits.positions`)
    probabilities: np.ndarray
    evaluation: Evaluation


@dataclass
class TestResult:
    evaluation: Evaluation
    probabilities: np.ndarray
    #: test-time augmentation on the test split (``test_tta_*``) and on validation (``final_val_tta_*``),
    #: which says, before anyone looks at the test figure, whether ``predict tta=true`` is worth it
    tta: Evaluation | None = None
    val_tta: Evaluation | None = None
    #: the validation split, predicted once more by the final model (its weights are the best epoch's)
    val: SplitPredictions | None = None
    #: `Splits.fingerprint` of the splits both were cut from, and the test images' `Splits.positions`
    split_fingerprint: str = ""
    test_index: np.ndarray | None = None
    #: the model the run logs, whose outputs `probabilities` and `val.probabilities` are: the final model,
    #: followed by its temperature (bloodcell.evaluation.calibration) when ``trainer.calibrate``
    model: keras.Model | None = None
    #: the temperature fitted on the validation split, and the final model's probabilities before it
    temperature: float | None = None
    uncalibrated: dict[str, np.ndarray] = field(default_factory=dict)

    def tta_metrics(self) -> dict[str, float]:
        """``test_tta_*`` and ``final_val_tta_*`` when `add_tta` scored them; else nothing."""
        return {k: v for e in (self.tta, self.val_tta) if e is not None for k, v in e.metrics.items()}


def final_result(
    model: keras.Model,
    splits: Splits,
    val_probabilities: np.ndarray,
    probabilities: np.ndarray,
    calibrate: bool,
) -> TestResult:
    """A final model's validation and test predictions, scored. With ``calibrate`` a temperature fitted on
    validation is applied to both and the model ends with it: every probability the run reports is the
    logged model's (a training run's, and an ensemble's, `bloodcell.ensemble`)."""
    import numpy as np

    from bloodcell.evaluation.metrics import evaluate_predictions

    temperature, uncalibrated = None, {}
    if calibrate:
        from bloodcell.evaluation.calibration import apply_temperature, fit_temperature, with_temperature

        temperature = fit_temperature(val_probabilities, splits.val.labels)
        model = with_temperature(model, temperature)
        uncalibrated = {"val": val_probabilities, "test": probabilities}
        val_probabilities = apply_temperature(val_probabilities, temperature).astype(np.float32)
        probabilities = apply_temperature(probabilities, temperature).astype(np.float32)
        log.info("temperature scaling: T = %.3f (fitted on the validation split)", temperature)
    val = SplitPredictions(
        splits.val,
        splits.positions("val"),
        val_probabilities,
        evaluate_predictions(splits.val.labels, val_probabilities, "final_val_"),
    )
    return TestResult(
        evaluate_predictions(splits.test.labels, probabilities),
        probabilities,
        val=val,
        split_fingerprint=splits.fingerprint(),
        test_index=splits.positions("test"),
        model=model,
        temperature=temperature,
        uncalibrated=uncalibrated,
    )


def add_tta(result: TestResult, splits: Splits, batch_size: int) -> None:
    """Test-time augmentation with the model the run logs, on the test split (``result.tta``, metrics
    ``test_tta_*``) and on validation (``result.val_tta``, ``final_val_tta_*``): the mean over views of its
    probabilities, calibrated when it ends with a temperature, as ``python -m bloodcell.predict tta=true``
    gives them. Validation is what decides whether to use it: the test split only reports."""
    from bloodcell.evaluation.metrics import evaluate_predictions
    from bloodcell.serving.prediction import predict_arrays

    assert result.model is not None and result.val is not None, "final_result gives the model and validation"
    val = predict_arrays(result.model, splits.val.images, batch_size, tta=True)
    result.val_tta = evaluate_predictions(splits.val.labels, val, "final_val_tta_")
    test = predict_arrays(result.model, splits.test.images, batch_size, tta=True)
    result.tta = evaluate_predictions(splits.test.labels, test, "test_tta_")
    plain = result.val.evaluation.metrics["final_val_accuracy"]
    augmented = result.val_tta.metrics["final_val_tta_accuracy"]
    log.info(
        "test-time augmentation: validation accuracy %.4f without, %.4f with (%s); test accuracy with it "
        "%.4f",
        plain,
        augmented,
        "predict tta=true is worth it" if augmented > plain else "no gain on validation: leave tta off",
        result.tta.metrics["test_tta_accuracy"],
    )
