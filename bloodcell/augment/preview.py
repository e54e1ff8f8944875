"""A picture of what a pipeline does: originals and augmented views side by side, as one uint8 image
(``python -m bloodcell.augment_preview`` writes it as a PNG; train logs it to MLflow)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bloodcell.augment.pipeline import build_augmentation
from bloodcell.errors import UserError

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
