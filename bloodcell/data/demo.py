"""The built-in demo set: procedurally generated, SYNTHETIC cell-like images in the 8 classes.

They are not real blood cells. They exist so that `+experiment=quickstart` and the tests run with no
download and no file: each class has its own look (cell size, nucleus shape and lobes, cytoplasm colour,
granules), with random position, size, rotation, stain and noise, so a model has something real to learn.
Deterministic for a given (per_class, image_size, seed).
"""

from __future__ import annotations

import numpy as np

from bloodcell import NUM_CLASSES

# Per class: cell radius (fraction of the image), nucleus lobes, nucleus radius (fraction of the cell),
# cytoplasm RGB, granule count and granule RGB. Loosely modelled on May-Grünwald-Giemsa smears.
_CLASS_LOOK = [
    # radius lobes nucleus cytoplasm         granules granule colour
    (0.30, 2, 0.55, (200, 170, 215), 60, (70, 30, 110)),  # basophil: dark purple granules everywhere
    (0.32, 2, 0.40, (235, 170, 140), 45, (215, 90, 60)),  # eosinophil: bilobed, orange granules
    (0.22, 1, 0.62, (170, 120, 150), 0, (0, 0, 0)),  # erythroblast: small, round dense nucleus
    (0.36, 1, 0.55, (190, 180, 215), 12, (150, 90, 150)),  # immature granulocyte: large, bluish
    (0.24, 1, 0.80, (160, 185, 230), 0, (0, 0, 0)),  # lymphocyte: nucleus fills the cell
    (0.40, 1, 0.60, (185, 180, 200), 0, (0, 0, 0)),  # monocyte: largest, folded nucleus
    (0.31, 4, 0.30, (225, 200, 215), 8, (180, 140, 180)),  # neutrophil: multi-lobed nucleus
    (0.10, 0, 0.00, (150, 100, 170), 6, (110, 60, 140)),  # platelet: tiny fragment
]
_NUCLEUS_RGB = np.array([95, 50, 125], dtype=np.float32)
_BACKGROUND_RGB = np.array([232, 208, 205], dtype=np.float32)


def _one_image(cls: int, size: int, rng: np.random.Generator) -> np.ndarray:
    radius, lobes, nuc_frac, cyto_rgb, n_granules, granule_rgb = _CLASS_LOOK[cls]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx = 0.5 + rng.normal(0, 0.04, 2)
    r = radius * rng.uniform(0.85, 1.15)
    angle = rng.uniform(0, 2 * np.pi)
    dy, dx = yy - cy, xx - cx
    # a slightly wobbly, slightly elliptic outline
    theta = np.arctan2(dy, dx)
    wobble = 1 + 0.06 * np.sin(3 * theta + rng.uniform(0, 6.3)) + 0.05 * np.cos(2 * (theta - angle))
    dist = np.hypot(dy, dx) / wobble
    stain = rng.normal(1.0, 0.05, 3).astype(np.float32)
    image = np.broadcast_to(_BACKGROUND_RGB * stain, (size, size, 3)).copy()
    cell = dist < r
    image[cell] = np.array(cyto_rgb, np.float32) * stain
    nucleus = np.zeros((size, size), bool)
    if lobes:
        lobe_r = r * nuc_frac / (1 if lobes == 1 else 1.3)
        spread = 0 if lobes == 1 else r * 0.45
        for k in range(lobes):
            a = angle + 2 * np.pi * k / lobes
            ly, lx = cy + spread * np.sin(a), cx + spread * np.cos(a)
            nucleus |= np.hypot(yy - ly, xx - lx) < lobe_r * rng.uniform(0.85, 1.1)
        if cls == 5:  # monocyte: a kidney-shaped, indented nucleus
            nucleus &= (
                np.hypot(yy - cy - r * 0.5 * np.sin(angle), xx - cx - r * 0.5 * np.cos(angle)) > r * 0.3
            )
    image[nucleus & cell] = _NUCLEUS_RGB * stain
    for _ in range(n_granules):
        gr, ga = r * np.sqrt(rng.uniform(0, 0.9)), rng.uniform(0, 2 * np.pi)
        gy, gx = cy + gr * np.sin(ga), cx + gr * np.cos(ga)
        image[np.hypot(yy - gy, xx - gx) < max(0.012, r * 0.06)] = np.array(granule_rgb, np.float32) * stain
    image += np.asarray(rng.normal(0, 6, image.shape), dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_demo_set(per_class: int = 150, image_size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` synthetic images of each class, shuffled: uint8 (N, S, S, 3), int64 (N,)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    rng.shuffle(labels)
    images = np.stack([_one_image(int(c), image_size, rng) for c in labels])
    return images, labels.astype(np.int64)
