"""An explanation of any images by a model: which images (`select_images`: the first ``limit``, checked),
and the sheets drawn for them (`explain_images`): with labels, what a training run logs (per class the most
confident correct and wrong image with its Grad-CAM heat map, and the errors); without, every image with
its heat map and predicted class. `python -m bloodcell.explain` writes the sheets as PNGs,
`bloodcell.api.explain` shows them in a notebook.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bloodcell import CLASS_NAMES
from bloodcell.core.errors import UserError
from bloodcell.evaluation.gradcam import GradCam, Sheet, errors_sheet, gradcam_grid, gradcam_sheet

if TYPE_CHECKING:
    from bloodcell.serving.prediction import Images


@dataclass
class Explained:
    """The sheets (``gradcam``; ``errors`` with labels), the feature map they weigh, and with labels the
    model's probabilities and its error count."""

    sheets: dict[str, Sheet]
    layer: str
    probabilities: np.ndarray | None = None
    errors: int | None = None


def check_limit(limit: Any) -> None:
    """``limit`` is a count of images, or None for all."""
    if limit is not None and int(limit) < 1:
        raise UserError(f"limit={limit} must be >= 1 (or null for every image)")


def select_images(data: Images, limit: Any, source: str) -> Images:
    """The first ``limit`` images (None: all) of ``data``, RGB, with labels that are class ids: checked
    before any model loads."""
    from bloodcell.serving.prediction import check_images

    check_limit(limit)
    check_images(data.images, (None, None, 3), source)
    count = int(limit) if limit else len(data.images)
    labels = data.labels[:count] if data.labels is not None else None
    if labels is not None and ((labels < 0) | (labels >= len(CLASS_NAMES))).any():
        raise UserError(
            f"{source}: labels outside 0-{len(CLASS_NAMES) - 1} (class ids of {', '.join(CLASS_NAMES)})"
        )
    return dataclasses.replace(data, images=data.images[:count], names=data.names[:count], labels=labels)


def explain_images(model: Any, data: Images, source: str, layer: str | None, batch_size: int) -> Explained:
    """The sheets of ``data`` (`select_images`' result) by ``model`` (a Keras model)."""
    from bloodcell.serving.loading import model_image_shape
    from bloodcell.serving.prediction import check_images, predict_arrays

    images, labels = data.images, data.labels
    check_images(images, model_image_shape(model), source)
    cam = GradCam.of(model, layer)
    if labels is None:
        grid = gradcam_grid(cam, images, data.names, f"Grad-CAM of {len(images)} images of {source}")
        return Explained({"gradcam": grid}, str(cam.layer))
    probabilities = predict_arrays(model, images, batch_size)
    title = f"Grad-CAM, {len(images)} images of {source}"
    drawn = {
        "gradcam": gradcam_sheet(cam, images, labels, probabilities, title),
        "errors": errors_sheet(images, labels, probabilities, "labelled"),
    }
    errors = int((probabilities.argmax(axis=1) != labels).sum())
    return Explained(drawn, str(cam.layer), probabilities, errors)
