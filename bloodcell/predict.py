"""`python -m bloodcell.predict`: class ids, names and probabilities for images, from any saved model.

    python -m bloodcell.predict model=models:/bloodcell@champion input=test.npz output=pred.csv
    python -m bloodcell.predict model=models:/bloodcell/3 input=cells/ output=pred.npy tta=true
    python -m bloodcell.predict model=runs:/<run id>/model input=cell.png output=pred.csv
    python -m bloodcell.predict model=path/to/model.keras input=test.npz output=pred.csv

``model`` is a registry URI (``models:/name@alias``, ``models:/name/version``), a logged model
(``models:/m-...``), a run's model (``runs:/<run id>/model``), an MLflow model folder or a ``.keras`` file.
``input`` is an npz (array ``images``, labels optional), a folder of images (flat, or one sub-folder per
class) or one image file. Images of another size than the model's input are resized to it (bilinear),
with a note, as the submission bundle's ``model.py`` does (the same function).

Output: CSV with one row per image (image, class_id, class_name, one probability column per class, and
``label`` when the input had labels), or .npy holding a structured array with fields image, class_id,
class_name, probabilities (8,) (``np.load(path)`` -- no pickle needed). With ``review_below=0.9`` both
also say per image whether its top probability is below 0.9 (``review``: true/false), and the count is
printed: the cells to send to a human. ``review_accuracy=0.99`` instead takes the threshold the model's
run certified for 99% accuracy among the kept cells (chosen on its validation split, with the confidence
it states: docs/statistics.md), and prints that promise.
"""

from __future__ import annotations

import hydra
import numpy as np
from omegaconf import DictConfig

from bloodcell import CLASS_NAMES, NUM_CLASSES, PROJECT_ROOT
from bloodcell.core.cli import exit_now, run_or_exit
from bloodcell.core.errors import UserError
from bloodcell.evaluation.abstention import review_mask, review_summary
from bloodcell.serving.loading import load_model, resize_for, resolve_model_uri, set_tracking
from bloodcell.serving.prediction import (
    check_images,
    check_output,
    predict_arrays,
    read_images,
    write_predictions,
)
from bloodcell.serving.review import stored_guarantee


def predict(cfg: DictConfig) -> np.ndarray:
    """Everything cheap is checked first (output, input), then the model is loaded once."""
    output = check_output(cfg.output, bool(cfg.overwrite))
    if int(cfg.batch_size) < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be >= 1")
    if not cfg.input:
        raise UserError("say what to predict: input=<file.npz | image folder | image file>")
    below, accuracy = cfg.review_below, cfg.get("review_accuracy")
    if below is not None and not _is_number_in(below, 0, 1, closed=True):
        raise UserError(
            f"review_below={below} must be a top probability in (0, 1], e.g. 0.9, or null for none"
        )
    if accuracy is not None and not _is_number_in(accuracy, 0, 1, closed=False):
        raise UserError(
            f"review_accuracy={accuracy} must be an accuracy in (0, 1), e.g. 0.99, or null for none"
        )
    if below is not None and accuracy is not None:
        raise UserError(
            "give review_below=<top probability> or review_accuracy=<accuracy among kept cells>, not both"
        )
    data = read_images(cfg.input)
    check_images(data.images, (None, None, 3), str(cfg.input))
    set_tracking(cfg.tracking)
    uri = resolve_model_uri(cfg.model)
    promise = None
    if accuracy is not None:  # the threshold the model's run certified, before the model is loaded
        import mlflow

        guarantee, run_id = stored_guarantee(uri, float(accuracy), mlflow.MlflowClient())
        below = guarantee.threshold
        promise = (
            f"review: {guarantee.promise()}: top probability >= {below:.4f}, certified on "
            f"{guarantee.calibration_images} validation cells of run {run_id}"
        )
    model = load_model(uri)
    size = resize_for(model, data.images)
    if size:  # one rule with the submission bundle: resize, and say so
        print(
            f"{cfg.input}: images are {data.images.shape[1]}x{data.images.shape[2]}, the model takes "
            f"{size[0]}x{size[1]}: resized to it (bilinear), as the submit bundle's model.py does"
        )
    probabilities = predict_arrays(
        model, data.images, int(cfg.batch_size), bool(cfg.tta), progress=True, resize_to=size
    )
    review = None if below is None else review_mask(probabilities, float(below))
    write_predictions(output, probabilities, data.names, data.labels, review)
    counts = np.bincount(probabilities.argmax(axis=1), minlength=NUM_CLASSES)
    summary = ", ".join(f"{CLASS_NAMES[c]} {n}" for c, n in enumerate(counts) if n)
    plural, tta = "s" * (len(probabilities) != 1), " (TTA)" if cfg.tta else ""
    print(f"wrote {len(probabilities)} prediction{plural} to {output}{tta}: {summary}")
    if data.labels is not None:
        print(f"accuracy against the input's labels: {(probabilities.argmax(1) == data.labels).mean():.4f}")
    if promise is not None:
        print(promise)
    if review is not None and below is not None:
        print(review_summary(review, float(below)))
    return probabilities


def _is_number_in(value: object, low: float, high: float, closed: bool) -> bool:
    """A number (not a bool) in (low, high], or (low, high) when not ``closed``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return low < value <= high if closed else low < value < high


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="predict")
def main(cfg: DictConfig) -> None:
    run_or_exit(predict, cfg)


if __name__ == "__main__":
    main()
    exit_now()  # done: skip the interpreter's teardown
