"""`python -m bloodcell.explain`: what a model looked at, as Grad-CAM sheets for any images (the sheets
every training run logs, `bloodcell.evaluation.gradcam`).

    python -m bloodcell.explain model=models:/bloodcell@champion input=test.npz output=explain/
    python -m bloodcell.explain model=runs:/<run id>/model input=cells/ output=explain/ limit=32

``input`` with labels (an npz with ``labels``) gives what a run logs: for each class the most confident
correct and the most confident wrong image with its heat map (``gradcam.png``), and the errors
(``errors.png``); without labels, every image (up to ``limit``) with its heat map and predicted class.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from bloodcell import CLASS_NAMES, PROJECT_ROOT
from bloodcell.core import outputs
from bloodcell.core.cli import run_or_exit
from bloodcell.core.errors import UserError
from bloodcell.core.outputs import atomic_path
from bloodcell.evaluation.gradcam import GradCam, errors_sheet, gradcam_grid, gradcam_sheet

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("bloodcell.explain")

#: the sheet files of the command (a run logs them as plots/gradcam.png and plots/test_errors.png)
GRADCAM_FILE, ERRORS_FILE = "gradcam.png", "errors.png"


# ---------------------------------------------------------------------------------------------- Grad-CAM


# ---------------------------------------------------------------------------------------------- sheets


# ---------------------------------------------------------------------------------------------- command


def check_output(output: str | None, overwrite: bool) -> Path:
    """The output folder; refused when it is a file or already holds the sheets (without overwrite)."""
    if not output:
        raise UserError("say where to write the sheets: output=<folder>")
    folder = Path(output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output {folder} is a file; give a folder for {GRADCAM_FILE} and {ERRORS_FILE}")
    for name in (GRADCAM_FILE, ERRORS_FILE):
        outputs.check_output(str(folder / name), overwrite, (".png",), "<folder>")
    return folder


def save(figure: Figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as partial:
        figure.savefig(partial)
    plt.close(figure)


def explain(cfg: DictConfig) -> list[Path]:
    """Cheap checks first (output, input), then the model is loaded once."""
    from bloodcell.serving.loading import load_model, model_image_shape, resolve_model_uri, set_tracking
    from bloodcell.serving.prediction import check_images, predict_arrays, read_images

    folder = check_output(cfg.output, bool(cfg.overwrite))
    if not cfg.input:
        raise UserError("say which images: input=<file.npz | image folder | image file>")
    limit = cfg.limit
    if limit is not None and int(limit) < 1:
        raise UserError(f"limit={limit} must be >= 1 (or null for every image)")
    data = read_images(cfg.input)
    check_images(data.images, (None, None, 3), str(cfg.input))
    images = data.images[: int(limit)] if limit else data.images
    labels = data.labels[: len(images)] if data.labels is not None else None
    if labels is not None and ((labels < 0) | (labels >= len(CLASS_NAMES))).any():
        raise UserError(
            f"{cfg.input}: labels outside 0-{len(CLASS_NAMES) - 1} (class ids of {', '.join(CLASS_NAMES)})"
        )
    set_tracking(cfg.tracking)
    model = load_model(resolve_model_uri(cfg.model))
    check_images(images, model_image_shape(model), str(cfg.input))
    cam = GradCam.of(model, cfg.layer)
    written = []
    if labels is None:
        figure = gradcam_grid(cam, images, data.names, f"Grad-CAM of {len(images)} images of {cfg.input}")
        save(figure, folder / GRADCAM_FILE)
        written.append(folder / GRADCAM_FILE)
    else:
        probabilities = predict_arrays(model, images, int(cfg.batch_size))
        title = f"Grad-CAM, {len(images)} images of {cfg.input}"
        save(gradcam_sheet(cam, images, labels, probabilities, title), folder / GRADCAM_FILE)
        save(errors_sheet(images, labels, probabilities, "labelled"), folder / ERRORS_FILE)
        written += [folder / GRADCAM_FILE, folder / ERRORS_FILE]
        errors = int((probabilities.argmax(axis=1) != labels).sum())
        print(f"{errors} errors among {len(images)} labelled images")
    print(f"wrote {', '.join(str(p) for p in written)} (feature map: {cam.layer})")
    return written


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="explain")
def main(cfg: DictConfig) -> None:
    run_or_exit(explain, cfg)


if __name__ == "__main__":
    main()
