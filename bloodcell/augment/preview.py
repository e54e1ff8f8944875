"""A picture of what a pipeline does: originals and augmented views side by side, as one uint8 image
(``python -m bloodcell.augment_preview`` writes it as a PNG; train logs it to MLflow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bloodcell import CLASS_NAMES
from bloodcell.augment.pipeline import build_augmentation
from bloodcell.core.errors import UserError

#: preview_grid upscales tiles (nearest neighbour) to at least this many pixels so 32 px images stay visible.
MIN_TILE = 96
#: white pixels between preview tiles
PAD = 4


def _views(images_uint8: np.ndarray, aug_layer: Any, views: int, mixer: Any, labels: Any) -> list[np.ndarray]:
    onehot = None
    if mixer is not None:
        lab = np.zeros(len(images_uint8), np.int64) if labels is None else np.asarray(labels)
        onehot = np.eye(max(int(lab.max()) + 1, 2), dtype=np.float32)[lab]
    shown = []
    for _ in range(views):
        batch = images_uint8.astype(np.float32)
        if aug_layer is not None:
            batch = np.asarray(aug_layer(batch, training=True))
        if mixer is not None:
            batch = np.asarray(mixer(batch, onehot)[0])
        shown.append(np.clip(np.rint(batch), 0, 255).astype(np.uint8))
    return shown


def _tiled(columns: list[np.ndarray]) -> np.ndarray:
    """Columns of (N, H, W, 3) uint8 images -> one image, tiles upscaled to MIN_TILE, PAD apart."""
    n, h, w, _ = columns[0].shape
    scale = max(1, -(-MIN_TILE // max(h, w)))  # ceil
    th, tw = h * scale, w * scale
    grid = np.full((n * (th + PAD) + PAD, len(columns) * (tw + PAD) + PAD, 3), 255, np.uint8)
    for i in range(n):
        for j, column in enumerate(columns):
            y, x = PAD + i * (th + PAD), PAD + j * (tw + PAD)
            grid[y : y + th, x : x + tw] = column[i].repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def preview_grid(
    images_uint8: np.ndarray,
    aug_layer: Any,
    views: int = 6,
    seed: int | None = None,
    *,
    mixer: Any = None,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Original + ``views`` augmented views of each image, as one uint8 (rows, cols, 3) image.

    Row i is ``images_uint8[i]``; column 0 the original, then the views. Tiles are upscaled to at least
    MIN_TILE px (nearest neighbour), with PAD px of white between them. ``aug_layer`` is a layer from
    ``build_augmentation`` (None: the views equal the original). With ``seed`` set, the views come from
    a fresh copy of that pipeline seeded by ``seed``: reproducible, and the training layer's random
    stream is left untouched. ``mixer`` (from ``build_mixer``) mixes each view's batch within these images;
    ``labels`` (int class ids) only matter for it.
    """
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3 or images_uint8.dtype != np.uint8:
        raise UserError(
            f"preview needs uint8 images (N, H, W, 3), got {images_uint8.dtype} {images_uint8.shape}"
        )
    if views < 1:
        raise UserError(f"views={views} must be at least 1")
    if seed is not None and getattr(aug_layer, "aug_config", None) is not None:
        aug_layer = build_augmentation(aug_layer.aug_config, seed)
    return _tiled([images_uint8, *_views(images_uint8, aug_layer, views, mixer, labels)])


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
