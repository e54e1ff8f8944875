"""`python -m bloodcell.submit`: a competition submission zip from any saved model.

    python -m bloodcell.submit model=models:/bloodcell@champion output=submission.zip

The zip holds ``model.py`` (bloodcell/serving/submission_template.py: class ``Model`` whose
``predict(X)`` maps uint8 images (N, 96, 96, 3) to class ids (N,)) and ``model.keras`` beside it. It needs
numpy and TensorFlow/Keras only, not bloodcell. Before the zip is written the bundle is loaded from a scratch
folder and run on a blank batch, so a bundle that cannot load never leaves this command.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from bloodcell import PROJECT_ROOT
from bloodcell.core.cli import exit_now, run_or_exit
from bloodcell.serving.submission import COMPETITION_SHAPE, MODEL_FILE, build_submission, check_output


def submit(cfg: DictConfig) -> Path:
    output = check_output(cfg.output, bool(cfg.overwrite))
    from bloodcell.serving.loading import set_tracking

    set_tracking(cfg.tracking)
    height, width = build_submission(str(cfg.model) if cfg.model else "", output)
    note = (
        ""
        if (height, width) == COMPETITION_SHAPE[:2] or not (height and width)
        else f"; the model takes {height}x{width}, so model.py resizes 96x96 inputs to that"
    )
    size_mb = output.stat().st_size / 1e6
    print(f"wrote {output} ({size_mb:.1f} MB: model.py + {MODEL_FILE}) from {cfg.model}{note}")
    return output


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="submit")
def main(cfg: DictConfig) -> None:
    run_or_exit(submit, cfg)


if __name__ == "__main__":
    main()
    exit_now()  # done: skip the interpreter's teardown
