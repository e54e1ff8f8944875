"""Synthetic blood-smear-like images and the pollution the cleaner must catch, shared by the cleaning tests
(tests/e2e/test_clean.py, tests/unit/test_clean_embedding.py)."""

from __future__ import annotations

import io

import numpy as np

SIZE = 48
EOSIN = np.array([0.08, 0.62, 0.30])  # optical density per unit of stain: absorbs green -> pink
AZURE = np.array([0.65, 0.70, 0.22])  # absorbs red and green -> blue-purple
# per class: cell radius (fraction of the image), nucleus size (fraction of the cell), granules
LOOK = [
    (0.30, 0.7, 40),
    (0.32, 0.5, 30),
    (0.22, 0.7, 0),
    (0.34, 0.6, 8),
    (0.24, 0.85, 0),
    (0.36, 0.6, 0),
    (0.31, 0.45, 6),
    (0.12, 0.0, 5),
]


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(a, sigma)


def smear(rng: np.random.Generator, cls: int, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    eosin = np.full((size, size), rng.uniform(0.05, 0.09), np.float32)
    azure = np.full((size, size), rng.uniform(0.0, 0.02), np.float32)
    for _ in range(rng.integers(6, 12)):  # red cells: a pink disc with a pale centre
        cy, cx = rng.uniform(0, size, 2)
        r = size * rng.uniform(0.1, 0.14)
        d = np.hypot(yy - cy, xx - cx)
        eosin += np.where(d < r, rng.uniform(0.2, 0.3) - 0.12 * (d < 0.5 * r), 0)
    radius, nucleus, granules = LOOK[cls]
    r = size * radius * rng.uniform(0.85, 1.15)
    cy, cx = size / 2 + rng.normal(0, size * 0.03, 2)
    a, b = rng.uniform(0.8, 1.2, 2)
    d = np.hypot((yy - cy) / a, (xx - cx) / b)
    cell = d < r
    eosin[cell], azure[cell] = rng.uniform(0.08, 0.2), rng.uniform(0.2, 0.4)
    if nucleus:  # one to three lobes at random places: no two nuclei alike
        for _ in range(rng.integers(1, 4)):
            ny, nx = cy + rng.normal(0, r * 0.25), cx + rng.normal(0, r * 0.25)
            lobe = r * nucleus * rng.uniform(0.5, 0.8)
            azure[(np.hypot((yy - ny) * b, (xx - nx) * a) < lobe) & cell] = rng.uniform(1.0, 1.4)
    for _ in range(granules):
        gy, gx = cy + rng.uniform(-r, r) * 0.7, cx + rng.uniform(-r, r) * 0.7
        spot = np.hypot(yy - gy, xx - gx) < 1.2
        (azure if cls != 1 else eosin)[spot] += 0.6
    # fine texture: no two smears share it, every copy of one does
    eosin += _blur(rng.normal(0, 0.06, (size, size)), 0.6)
    azure += _blur(rng.normal(0, 0.04, (size, size)), 0.6)
    od = _blur(eosin, 0.5)[..., None] * EOSIN + _blur(azure, 0.5)[..., None] * AZURE
    image = 255 * np.exp(-od) + rng.normal(0, 2.5, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def smear_set(n_per_class: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(8), n_per_class)
    rng.shuffle(labels)
    return np.stack([smear(rng, int(c)) for c in labels]), labels.astype(np.int64)


def foreign_picture(rng: np.random.Generator, size: int = SIZE, photo_like: bool = True) -> np.ndarray:
    """Coloured shapes on a green ground, nothing like a smear; photo_like adds shading and sensor noise."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (90, 200, 120))
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = (int(v) for v in rng.integers(0, size - 10, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse([x0, y0, x0 + 14, y0 + 14], fill=colour, outline=(0, 0, 0))
    draw.rectangle([4, size - 8, size - 4, size - 4], fill=(250, 240, 20))
    picture = np.asarray(im, dtype=np.float32)
    if photo_like:
        picture = picture * np.linspace(0.8, 1.1, size)[:, None, None] + rng.normal(0, 3, picture.shape)
    return np.clip(picture, 0, 255).astype(np.uint8)


def jpeg(im: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(im).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def shifted(im: np.ndarray, dy: int, dx: int) -> np.ndarray:
    padded = np.pad(im, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    return padded[4 - dy : 4 - dy + im.shape[0], 4 - dx : 4 - dx + im.shape[1]]


def recoloured(im: np.ndarray) -> np.ndarray:
    return np.clip(im.astype(np.float32) * np.array([1.04, 0.97, 1.02]) + 3, 0, 255).astype(np.uint8)
