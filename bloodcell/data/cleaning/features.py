"""Hand-made features of a stained smear and their robust, class-aware outlier scores.

Each image is described by a few numbers that say what a stained smear looks like (how much of it,
overall and in its worst tile, has colours that no mix of two stains makes, i.e. off the plane fitted to
the data in optical-density space; its colour cast; its contrast and spread of densities; its darkest
stain; its fine texture; seams spanning the frame; how dark its centre is against its border). Each number
becomes a robust z-score against the bulk of the data (median and MAD, which a minority of polluted
samples cannot move)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# Optical density per 8-bit value: stains absorb light, so stained pixels are sums of stain vectors in OD.
_OD = (-np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

#: The outlier features and which direction is odd: +1 = only high values, 0 = both. Their smallest
#: trusted spreads are ``outliers.min_spread`` in conf/cleaning/default.yaml.
OUTLIER_DIRECTIONS: dict[str, int] = {
    "off_plane": +1,
    "off_plane_block": +1,
    "od_r": 0,
    "od_g": 0,
    "od_b": 0,
    "od_spread": 0,
    "darkest": 0,
    "fine_texture": +1,
    "seam": +1,
    "centre_contrast": 0,
    "grey_std": 0,
}


def grey(images: np.ndarray) -> np.ndarray:
    """Luma (0-255, float32) of uint8 RGB images (N, H, W, 3) -> (N, H, W)."""
    x = images.astype(np.float32)
    return x[..., 0] * _LUMA[0] + x[..., 1] * _LUMA[1] + x[..., 2] * _LUMA[2]


def pool(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f blocks of the two axes after the first (crops any remainder)."""
    n, h, w = a.shape[:3]
    h2, w2 = h // f, w // f
    a = a[:, : h2 * f, : w2 * f]
    return a.reshape(n, h2, f, w2, f, *a.shape[3:]).mean((2, 4))


def fit_stain_plane(
    images: np.ndarray, rng: np.random.Generator, n_pixels: int = 200_000, n_images: int = 2000
) -> np.ndarray:
    """The unit normal of the plane through the origin of OD space that holds most pixels' colours.

    A smear is stained by two dyes (eosin, an azure/methylene blue), so in optical density nearly every
    pixel is a non-negative mix of two vectors: a plane. Fitted on a pixel sample, then refitted twice on
    the 80% closest pixels so that polluted samples do not tilt it."""
    n = len(images)
    pick = rng.choice(n, size=min(n, n_images), replace=False)
    px = images[pick].reshape(-1, 3)
    if len(px) > n_pixels:
        px = px[rng.choice(len(px), size=n_pixels, replace=False)]
    od = _OD[px]
    keep = np.ones(len(od), bool)
    normal = np.array([0.0, 0.0, 1.0], np.float32)
    for _ in range(3):
        _, _, vt = np.linalg.svd(od[keep], full_matrices=False)
        normal = vt[2]
        resid = np.abs(od @ normal)
        keep = resid <= np.quantile(resid, 0.8)
    return normal.astype(np.float32)


def image_features(
    images: np.ndarray,
    plane_normal: np.ndarray,
    plane_tolerance: float,
    blocks: int,
    *,
    centre_radius: float = 0.2,
    border_radius: float = 0.42,
    darkest_quantile: float = 0.995,
    chunk: int = 512,
) -> dict[str, np.ndarray]:
    """Per-image numbers that describe a stained single-cell smear (each an (N,) float array).

    The keyword defaults are those of conf/cleaning/default.yaml (``outliers``, ``compute.chunk``)."""
    n, h, w, _ = images.shape
    names = ("repeated_rows", "extreme_pixels", *OUTLIER_DIRECTIONS)
    out = {k: np.empty(n, np.float32) for k in names}
    b = max(1, min(blocks, h // 4, w // 4))
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - (h - 1) / 2) / h, (xx - (w - 1) / 2) / w)
    centre, border = r < centre_radius, r > border_radius
    for s in range(0, n, chunk):
        x = images[s : s + chunk]
        m = len(x)
        # corrupt: rows identical to the row above (truncated decodes, pasted bars); pure black/white pixels
        out["repeated_rows"][s : s + m] = (x[:, 1:] == x[:, :-1]).all(axis=(2, 3)).mean(1)
        flat_px = x.reshape(m, -1, 3)
        out["extreme_pixels"][s : s + m] = ((flat_px == 0).all(-1) | (flat_px == 255).all(-1)).mean(1)
        g = grey(x)
        out["grey_std"][s : s + m] = g.reshape(m, -1).std(1)
        od = _OD[x]  # (m, h, w, 3)
        resid = od[..., 0] * plane_normal[0] + od[..., 1] * plane_normal[1] + od[..., 2] * plane_normal[2]
        off = np.abs(resid) > plane_tolerance  # a colour no two-stain mix makes
        out["off_plane"][s : s + m] = off.reshape(m, -1).mean(1)
        out["off_plane_block"][s : s + m] = pool(off.astype(np.float32), h // b).reshape(m, -1).max(1)
        mean_od = od.reshape(m, -1, 3).mean(1)
        out["od_r"][s : s + m], out["od_g"][s : s + m], out["od_b"][s : s + m] = mean_od.T
        tot = (od[..., 0] + od[..., 1] + od[..., 2]).reshape(m, -1)
        # spread of densities as a standard deviation: smooth in how much of the frame the cell covers
        out["od_spread"][s : s + m] = tot.std(1)
        # the darkest stain: every smear has a nucleus or granules, never pitch black
        out["darkest"][s : s + m] = np.quantile(tot, darkest_quantile, axis=1)
        # fine texture: pixel-to-pixel differences against the image's own contrast (noise, stripes)
        lap = np.abs(
            4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
        )
        out["fine_texture"][s : s + m] = lap.reshape(m, -1).mean(1) / (out["grey_std"][s : s + m] + 1.0)
        # a seam: one row (or column) step far larger than the image's usual step (a torn or shifted
        # decode, the edge of a pasted rectangle); natural edges are curved and never span the frame
        rows = np.abs(np.diff(g, axis=1)).mean(2)
        cols = np.abs(np.diff(g, axis=2)).mean(1)
        out["seam"][s : s + m] = np.maximum(
            rows.max(1) / (np.median(rows, 1) + 1.0), cols.max(1) / (np.median(cols, 1) + 1.0)
        )
        # the cell sits in the middle: the centre is darker (denser) than the border
        tot = tot.reshape(m, h, w)
        out["centre_contrast"][s : s + m] = tot[:, centre].mean(1) - tot[:, border].mean(1)
    return out


def robust_z(values: np.ndarray, direction: int, reference: np.ndarray, min_spread: float) -> np.ndarray:
    """(value - median) / (1.4826 MAD) over the reference samples; one-sided when direction=+1.

    Median and MAD ignore any minority of odd samples, however odd, so the pollution itself cannot
    widen the yardstick it is measured with (a standard deviation would)."""
    ref = values[reference]
    med = float(np.median(ref))
    spread = max(1.4826 * float(np.median(np.abs(ref - med))), min_spread)
    z = (values - med) / spread
    return np.maximum(z, 0.0) if direction > 0 else np.abs(z)


def class_aware(
    score: Callable[[np.ndarray], np.ndarray],
    labels: np.ndarray,
    reference: np.ndarray,
    min_class_samples: int,
) -> np.ndarray:
    """Outlier scores (K, N) that count only where a sample is odd against all samples *and* against its
    own class: ``score(members)`` scores the samples of the boolean mask ``members`` against the reference
    samples among them (shape (K, members.sum())).

    Classes look different (a platelet is a speck, a monocyte fills the frame), so a rare class is never
    an outlier for being rare; pollution carries random labels and is odd either way. A class with fewer
    than ``min_class_samples`` reference samples is scored against all samples only."""
    z = score(np.ones(len(labels), bool))
    for c in np.unique(labels):
        in_c = labels == c
        if (reference & in_c).sum() >= min_class_samples:
            z[:, in_c] = np.minimum(z[:, in_c], score(in_c))
    return z


def feature_z(
    feats: Mapping[str, np.ndarray], labels: np.ndarray, reference: np.ndarray, outlier_cfg: Mapping[str, Any]
) -> tuple[np.ndarray, list[str]]:
    """Class-aware robust z-scores (K, N) of the outlier features and the features' names."""
    names = list(OUTLIER_DIRECTIONS)
    spread = outlier_cfg["min_spread"]

    def score(members: np.ndarray) -> np.ndarray:
        return np.stack(
            [robust_z(feats[k][members], OUTLIER_DIRECTIONS[k], reference[members], spread[k]) for k in names]
        )

    return class_aware(score, labels, reference, int(outlier_cfg["min_class_samples"])), names
