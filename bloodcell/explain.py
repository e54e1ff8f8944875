"""`python -m bloodcell.explain`: what a model looked at, as Grad-CAM sheets for any images (the sheets
every training run logs, `bloodcell.evaluation.gradcam`).

    python -m bloodcell.explain model=models:/bloodcell@champion input=test.npz output=explain/
    python -m bloodcell.explain model=runs:/<run id>/model input=cells/ output=explain/ limit=32

``input`` with labels (an npz with ``labels``) gives what a run logs: for each class the most confident
correct and the most confident wrong image with its heat map (``gradcam.png``), and the errors
(``errors.png``); without labels, every image (up to ``limit``) with its heat map and predicted class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from bloodcell import PROJECT_ROOT
from bloodcell.core import outputs
from bloodcell.core.cli import exit_now, run_or_exit
from bloodcell.core.errors import UserError
from bloodcell.core.outputs import atomic_path

if TYPE_CHECKING:
    from bloodcell.evaluation.gradcam import Sheet

#: the sheet files of the command (a run logs them as plots/gradcam.png and plots/test_errors.png)
GRADCAM_FILE, ERRORS_FILE = "gradcam.png", "errors.png"


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


def save(sheet: Sheet, path: Path) -> None:
    with atomic_path(path) as partial:
        sheet.save(partial)


def explain(cfg: DictConfig) -> list[Path]:
    """Cheap checks first (output, input), then the model is loaded once; the sheets are the library's
    (bloodcell.evaluation.explanation, as bloodcell.api.explain draws them)."""
    from bloodcell.evaluation.explanation import check_limit, explain_images, select_images
    from bloodcell.serving.loading import load_model, resolve_model_uri, set_tracking
    from bloodcell.serving.prediction import read_images

    folder = check_output(cfg.output, bool(cfg.overwrite))
    if not cfg.input:
        raise UserError("say which images: input=<file.npz | image folder | image file>")
    check_limit(cfg.limit)  # before the input is read
    data = select_images(read_images(cfg.input), cfg.limit, str(cfg.input))
    set_tracking(cfg.tracking)
    model = load_model(resolve_model_uri(cfg.model))
    explained = explain_images(model, data, str(cfg.input), cfg.layer, int(cfg.batch_size))
    files = {"gradcam": folder / GRADCAM_FILE, "errors": folder / ERRORS_FILE}
    for name, sheet in explained.sheets.items():
        save(sheet, files[name])
    if explained.errors is not None:
        print(f"{explained.errors} errors among {len(data.images)} labelled images")
    written = [files[name] for name in explained.sheets]
    print(f"wrote {', '.join(str(p) for p in written)} (feature map: {explained.layer})")
    return written


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="explain")
def main(cfg: DictConfig) -> None:
    run_or_exit(explain, cfg)


if __name__ == "__main__":
    main()
    exit_now()  # done: skip the interpreter's teardown
