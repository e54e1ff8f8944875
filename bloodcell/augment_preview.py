"""See what an augmentation pipeline does: a PNG grid, one row per sample, the original then augmented views.

    python -m bloodcell.augment_preview +experiment=quickstart augmentation=heavy augmentation.strength=0.6
    python -m bloodcell.augment_preview augmentation=mixup output=mixup.png samples=8 views=4 overwrite=true

Primary config ``conf/augment_preview.yaml``: the training config (``train``) plus ``output``, ``samples``,
``views`` and ``overwrite``, so every training override (data, augmentation, seed ...) works here too.

The grid itself is ``bloodcell.augment.preview_grid`` (what train logs to MLflow as
``plots/augmentation_preview.png``); ``write_preview`` adds sample picking, column titles and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bloodcell import PROJECT_ROOT
from bloodcell.augment.preview import write_preview
from bloodcell.core.cli import exit_now, run_or_exit
from bloodcell.core.errors import UserError


def run(cfg: Any) -> Path:
    """The CLI's work: load ``cfg.data``, write the preview to ``cfg.output``."""
    from bloodcell.data import load_arrays

    output = Path(str(cfg.output)).expanduser()
    if output.suffix.lower() != ".png":
        raise UserError(f"output={output} must end in .png")
    if output.exists() and not cfg.overwrite:
        raise UserError(f"{output} already exists; pass overwrite=true or choose another output=")
    arrays = load_arrays(cfg.data)
    path = write_preview(
        cfg.augmentation,
        arrays.images,
        arrays.labels,
        output,
        seed=int(cfg.seed),
        samples=int(cfg.samples),
        views=int(cfg.views),
        overwrite=bool(cfg.overwrite),
    )
    print(
        f"wrote {path} ({cfg.augmentation.name}, strength {cfg.augmentation.strength}, "
        f"{cfg.samples} samples x {cfg.views} views)"
    )
    return path


def _main() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="augment_preview")
    def main(cfg: Any) -> None:
        run_or_exit(run, cfg)

    main()


if __name__ == "__main__":
    _main()
    exit_now()  # done: skip the interpreter's teardown
