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

import numpy as np

from bloodcell import CLASS_NAMES, PROJECT_ROOT
from bloodcell.augment import MIN_TILE, PAD, preview_grid
from bloodcell.errors import UserError

HEADER = 16  # pixels of column titles above the grid in the PNG


def pick_samples(labels: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Indices of ``samples`` images, one class after another (round robin) so every class shows up."""
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    picked: list[int] = []
    while len(picked) < samples and any(by_class):
        for queue in by_class:
            if queue and len(picked) < samples:
                picked.append(queue.pop())
    return np.asarray(picked, dtype=np.int64)


def preview_size(image_hw: tuple[int, int], samples: int, views: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG that write_preview writes for these sizes."""
    h, w = image_hw
    scale = max(1, -(-MIN_TILE // max(h, w)))
    return (1 + views) * (w * scale + PAD) + PAD, HEADER + samples * (h * scale + PAD) + PAD


def _save_png(grid: np.ndarray, path: Path, titles: list[str], tile_w: int) -> None:
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + HEADER), "white")
    canvas.paste(Image.fromarray(grid), (0, HEADER))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((PAD + j * (tile_w + PAD) + 2, 2), title, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")


def write_preview(
    aug_cfg: Any,
    images_uint8: np.ndarray,
    labels: np.ndarray | None,
    path: str | Path,
    *,
    seed: int = 0,
    samples: int = 6,
    views: int = 6,
    overwrite: bool = True,
) -> Path:
    """Build the pipeline ``aug_cfg`` describes (fresh layers seeded by ``seed``, so the training layer's
    random stream is untouched), pick ``samples`` images (classes in turn), and write the grid as a PNG.

    Returns the path. With ``overwrite=False`` an existing file is a UserError.
    """
    from bloodcell.augment import build_augmentation, build_mixer

    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass overwrite=true or choose another output=")
    if samples < 1 or views < 1:
        raise UserError(f"samples={samples} and views={views} must both be at least 1")
    labels_arr = np.zeros(len(images_uint8), np.int64) if labels is None else np.asarray(labels)
    index = pick_samples(labels_arr, samples, seed)
    if len(index) == 0:
        raise UserError("no images to preview; check the data config")
    layer = build_augmentation(aug_cfg, seed)
    mixer = build_mixer(aug_cfg, len(CLASS_NAMES), seed)
    grid = preview_grid(images_uint8[index], layer, views, mixer=mixer, labels=labels_arr[index])
    h, w = images_uint8.shape[1:3]
    scale = max(1, -(-MIN_TILE // max(h, w)))
    _save_png(grid, path, ["original"] + [f"view {k + 1}" for k in range(views)], w * scale)
    return path


def run(cfg: Any) -> Path:
    """The CLI's work: load ``cfg.data``, write the preview to ``cfg.output``."""
    from bloodcell.data import load_arrays

    output = Path(str(cfg.output)).expanduser()
    if output.suffix.lower() != ".png":
        raise UserError(f"output={output} must end in .png")
    if output.exists() and not cfg.get("overwrite", False):
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
        overwrite=bool(cfg.get("overwrite")),
    )
    print(
        f"wrote {path} ({cfg.augmentation.name}, strength {cfg.augmentation.strength}, "
        f"{cfg.samples} samples x {cfg.views} views)"
    )
    return path


def _main() -> None:
    import hydra

    from bloodcell.cli import run_or_exit

    @hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="augment_preview")
    def main(cfg: Any) -> None:
        run_or_exit(run, cfg)

    main()


if __name__ == "__main__":
    _main()
