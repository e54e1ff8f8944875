"""Find and remove the unwanted samples of a training set: duplicates, near duplicates, duplicate groups
with conflicting labels, and images that are not stained single-cell smears at all (pasted or blended
pictures, blank or flat frames, corrupt data).

Nothing here is told what the pollution looks like. Every test is relative to the data set itself:

* **corrupt / flat** -- cheap per-image rules: long runs of identical rows (a truncated decode), many
  pure black or pure white pixels, a label that is no class id; almost no grey-level variation.
* **outlier** -- each image is described by a few numbers that say what a stained smear looks like
  (how much of it, overall and in its worst tile, has colours that no mix of two stains makes, i.e.
  off the plane fitted to the data in optical-density space; its colour cast; its contrast and spread of
  densities; its darkest stain; its fine texture; seams spanning the frame; how dark its centre is
  against its border). Each number becomes a robust z-score against the bulk of the data (median and
  MAD, which a minority of polluted samples cannot move) -- against all images and against the image's
  own class, the smaller counting -- and an image whose largest z-score passes ``outliers.max_z`` is
  removed.
* **duplicate / conflicting_labels** -- exact copies by byte hash; near copies (re-encoded, shifted by a
  few pixels, recoloured, flipped or rotated) by nearest neighbours on a small normalised grey thumbnail,
  confirmed at full resolution by the best correlation over small shifts and by the correlation of their
  fine detail (a copy shares its texture pixel for pixel, a look-alike cell does not). A group whose labels
  agree keeps one copy; a group whose labels conflict is dropped whole (``conflicting_labels: drop_group``)
  or keeps one copy of a strict majority label (``keep_majority``).

Library use (what training calls when ``data.clean=true``)::

    result = find_unwanted(images, labels, cfg.cleaning)      # or find_unwanted_cached(..., fingerprint, dir)
    write_report(result, images, labels, out_dir)             # JSON + contact sheet of what goes
    images, labels = images[result.keep], labels[result.keep]

Command line::

    python -m bloodcell.clean input=data/training_set.npz output=data/training_set_clean.npz
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from bloodcell import CLASS_NAMES, NUM_CLASSES, PROJECT_ROOT
from bloodcell.cli import run_or_exit
from bloodcell.errors import UserError

#: Reasons, in the order the checks run (an image gets the first reason that applies).
REASONS = ("corrupt", "flat", "outlier", "duplicate", "conflicting_labels")

#: What the ``score`` of a removed sample measures, per reason (also written into the JSON report).
SCORE_MEANING = {
    "corrupt": "worst of the repeated-row and black/white-pixel fractions, as a multiple of its limit "
    "(1.0 for a bad label)",
    "flat": "grey-level standard deviation (0-255)",
    "outlier": "largest robust z-score of its features (see 'feature')",
    "duplicate": "correlation with its closest copy (1.0 = identical pixels)",
    "conflicting_labels": "correlation with its closest copy (1.0 = identical pixels)",
}

#: The defaults of conf/cleaning/default.yaml, so the library also works without Hydra.
DEFAULTS: dict[str, Any] = {
    "corrupt": {"max_repeated_rows": 0.25, "max_extreme_pixels": 0.02},
    "flat": {"min_std": 4.0},
    "outliers": {
        "enabled": True,
        "max_z": 10.0,
        "plane_tolerance": 0.15,
        "blocks": 4,
        "min_samples": 30,
        "min_class_samples": 8,
    },
    "duplicates": {
        "exact": True,
        "near": True,
        "neighbours": 3,
        "coarse_correlation": 0.85,
        "min_correlation": 0.95,
        "min_detail_correlation": 0.6,
        "max_shift": 6,
        "match_flips": True,
        "conflicting_labels": "drop_group",
    },
}

_CHUNK = 512  # images per vectorised step: bounds memory at a few hundred MB


@dataclass
class CleaningResult:
    """What :func:`find_unwanted` decided.

    ``keep`` is a boolean mask over the input; ``removed`` one dict per removed sample (``index``,
    ``label``, ``reason``, ``score`` and, for duplicates, ``group``: the group's id); ``counts`` the number
    removed per reason; ``groups`` every duplicate group found (all members, kept ones included)."""

    keep: np.ndarray
    removed: list[dict]
    counts: dict[str, int]
    groups: list[list[int]] = field(default_factory=list)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def n_removed(self) -> int:
        return int((~self.keep).sum())


# ----------------------------------------------------------------------------------------------- config


def _resolve_cfg(cfg) -> dict:
    """The defaults, overlaid with ``cfg`` (a dict, an OmegaConf node or None)."""
    if cfg is not None and not isinstance(cfg, Mapping):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    out = {k: dict(v) for k, v in DEFAULTS.items()}
    for section, values in (dict(cfg) if cfg else {}).items():
        if section in out and isinstance(values, Mapping):
            unknown = set(values) - set(out[section])
            if unknown:
                raise UserError(
                    f"cleaning.{section}: unknown key(s) {sorted(unknown)}; known: {sorted(out[section])}"
                )
            out[section].update(values)
        elif section not in out:
            raise UserError(f"cleaning: unknown section {section!r}; known: {sorted(out)}")
    policy = out["duplicates"]["conflicting_labels"]
    if policy not in ("drop_group", "keep_majority"):
        raise UserError(f"cleaning.duplicates.conflicting_labels={policy!r}; use drop_group or keep_majority")
    return out


# --------------------------------------------------------------------------------------------- features

# Optical density per 8-bit value: stains absorb light, so stained pixels are sums of stain vectors in OD.
_OD = (-np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _grey(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32)
    return x[..., 0] * _LUMA[0] + x[..., 1] * _LUMA[1] + x[..., 2] * _LUMA[2]


def _pool(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f blocks of the two axes after the first (crops any remainder)."""
    n, h, w = a.shape[:3]
    h2, w2 = h // f, w // f
    a = a[:, : h2 * f, : w2 * f]
    return a.reshape(n, h2, f, w2, f, *a.shape[3:]).mean((2, 4))


def fit_stain_plane(images: np.ndarray, rng: np.random.Generator, n_pixels: int = 200_000) -> np.ndarray:
    """The unit normal of the plane through the origin of OD space that holds most pixels' colours.

    A smear is stained by two dyes (eosin, an azure/methylene blue), so in optical density nearly every
    pixel is a non-negative mix of two vectors: a plane. Fitted on a pixel sample, then refitted twice on
    the 80% closest pixels so that polluted samples do not tilt it."""
    n = len(images)
    pick = rng.choice(n, size=min(n, 2000), replace=False)
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
    images: np.ndarray, plane_normal: np.ndarray, plane_tolerance: float, blocks: int
) -> dict[str, np.ndarray]:
    """Per-image numbers that describe a stained single-cell smear (each an (N,) float array)."""
    n, h, w, _ = images.shape
    names = (
        "repeated_rows",
        "extreme_pixels",
        "grey_std",
        "off_plane",
        "off_plane_block",
        "od_r",
        "od_g",
        "od_b",
        "od_spread",
        "darkest",
        "fine_texture",
        "seam",
        "centre_contrast",
    )
    out = {k: np.empty(n, np.float32) for k in names}
    b = max(1, min(blocks, h // 4, w // 4))
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - (h - 1) / 2) / h, (xx - (w - 1) / 2) / w)
    centre, border = r < 0.2, r > 0.42
    for s in range(0, n, _CHUNK):
        x = images[s : s + _CHUNK]
        m = len(x)
        # corrupt: rows identical to the row above (truncated decodes, pasted bars); pure black/white pixels
        out["repeated_rows"][s : s + m] = (x[:, 1:] == x[:, :-1]).all(axis=(2, 3)).mean(1)
        flat_px = x.reshape(m, -1, 3)
        out["extreme_pixels"][s : s + m] = ((flat_px == 0).all(-1) | (flat_px == 255).all(-1)).mean(1)
        g = _grey(x)
        out["grey_std"][s : s + m] = g.reshape(m, -1).std(1)
        od = _OD[x]  # (m, h, w, 3)
        resid = od[..., 0] * plane_normal[0] + od[..., 1] * plane_normal[1] + od[..., 2] * plane_normal[2]
        off = np.abs(resid) > plane_tolerance  # a colour no two-stain mix makes
        out["off_plane"][s : s + m] = off.reshape(m, -1).mean(1)
        out["off_plane_block"][s : s + m] = _pool(off.astype(np.float32), h // b).reshape(m, -1).max(1)
        mean_od = od.reshape(m, -1, 3).mean(1)
        out["od_r"][s : s + m], out["od_g"][s : s + m], out["od_b"][s : s + m] = mean_od.T
        tot = (od[..., 0] + od[..., 1] + od[..., 2]).reshape(m, -1)
        # spread of densities as a standard deviation: smooth in how much of the frame the cell covers
        out["od_spread"][s : s + m] = tot.std(1)
        q995 = np.quantile(tot, 0.995, axis=1)
        # the darkest stain: every smear has a nucleus or granules, never pitch black
        out["darkest"][s : s + m] = q995
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


# The outlier features: +1 = only high values are odd, 0 = both directions; and the smallest spread
# (robust standard deviation) each is trusted to have, so that a feature that hardly varies in a given
# data set (e.g. synthetic images with flat colours) does not turn tiny differences into huge scores.
_OUTLIER_FEATURES = {
    "off_plane": (+1, 0.01),
    "off_plane_block": (+1, 0.02),
    "od_r": (0, 0.01),
    "od_g": (0, 0.01),
    "od_b": (0, 0.01),
    "od_spread": (0, 0.02),
    "darkest": (0, 0.02),
    "fine_texture": (+1, 0.02),
    "seam": (+1, 0.1),
    "centre_contrast": (0, 0.01),
    "grey_std": (0, 0.5),
}


def robust_z(values: np.ndarray, direction: int, reference: np.ndarray, min_spread: float) -> np.ndarray:
    """(value - median) / (1.4826 MAD) over the reference samples; one-sided when direction=+1.

    Median and MAD ignore any minority of odd samples, however odd, so the pollution itself cannot
    widen the yardstick it is measured with (a standard deviation would)."""
    ref = values[reference]
    med = float(np.median(ref))
    spread = max(1.4826 * float(np.median(np.abs(ref - med))), min_spread)
    z = (values - med) / spread
    return np.maximum(z, 0.0) if direction > 0 else np.abs(z)


# ------------------------------------------------------------------------------------------- duplicates


def _standardise(a: np.ndarray) -> np.ndarray:
    """Rows to zero mean and unit norm: correlation becomes a dot product, and brightness, contrast and
    (on grey) most recolouring drop out."""
    a = a.reshape(len(a), -1)
    a = a - a.mean(1, keepdims=True, dtype=np.float32)
    a /= np.sqrt(np.einsum("ij,ij->i", a, a))[:, None] + 1e-6
    return a.astype(np.float32, copy=False)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


_DIHEDRAL = (
    lambda a: a,
    lambda a: a[:, :, ::-1],
    lambda a: a[:, ::-1, :],
    lambda a: a[:, ::-1, ::-1],
    lambda a: a.transpose(0, 2, 1),
    lambda a: a.transpose(0, 2, 1)[:, :, ::-1],
    lambda a: a.transpose(0, 2, 1)[:, ::-1, :],
    lambda a: a.transpose(0, 2, 1)[:, ::-1, ::-1],
)


def near_duplicate_pairs(
    images: np.ndarray, candidates: np.ndarray, dup_cfg: Mapping
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, correlation) of near copies among ``images[candidates]`` (indices into images).

    Three steps, each cheap enough for the next: the nearest neighbours of a 12 x 12 standardised grey
    thumbnail (tolerant of a few pixels of shift, of JPEG noise and of recolouring); the best correlation
    of ~32 x 32 thumbnails over small shifts (keeps pairs above ``coarse_correlation``); and the best
    correlation at full resolution over whole-pixel shifts up to ``max_shift`` around the coarse best,
    which must reach ``min_correlation``. Full resolution is what separates a re-encoded or shifted copy
    (it lines up pixel for pixel) from a different cell that merely looks alike."""
    from sklearn.neighbors import NearestNeighbors

    idx = np.asarray(candidates)
    if len(idx) < 2:
        return []
    n, h, w = len(idx), images.shape[1], images.shape[2]
    f = max(1, int(round(h / 32)))
    # grey kept as uint8 (a quarter of the memory); thumbnails pooled chunk by chunk
    grey = np.empty((n, h, w), np.uint8)
    small = np.empty((n, h // max(1, h // 12), w // max(1, h // 12)), np.float32)
    coarse = np.empty((n, h // f, w // f), np.float32)
    for s in range(0, n, _CHUNK):
        g = _grey(images[idx[s : s + _CHUNK]])
        grey[s : s + _CHUNK] = np.rint(g).astype(np.uint8)
        small[s : s + _CHUNK] = _pool(g, max(1, h // 12))
        coarse[s : s + _CHUNK] = _pool(g, f)
    max_shift = int(dup_cfg["max_shift"])
    cs = min(int(np.ceil(max_shift / f)), coarse.shape[1] // 4, coarse.shape[2] // 4)
    c_h, c_w = coarse.shape[1] - 2 * cs, coarse.shape[2] - 2 * cs
    transforms = _DIHEDRAL if dup_cfg["match_flips"] and h == w else _DIHEDRAL[:1]

    k = min(int(dup_cfg["neighbours"]) + 1, n)
    # neighbours in the thumbnails' 32 leading principal directions: 4x cheaper than all 144 pixels and,
    # for candidates that a finer test then confirms, as good
    index = _standardise(small)
    basis = np.linalg.svd(index[:: max(1, n // 2000)], full_matrices=False)[2][:32].T.copy()
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(index @ basis)
    coarse_min = float(dup_cfg["coarse_correlation"])
    shifts = [(dy, dx) for dy in range(-cs, cs + 1) for dx in range(-cs, cs + 1)]
    # the norm of every shifted window after removing its mean, from box sums: the query side is
    # standardised, so its dot product with the raw window over this norm is their correlation
    size = c_h * c_w
    win_norm = np.empty((len(shifts), n), np.float32)
    for b_id, (dy, dx) in enumerate(shifts):
        win = coarse[:, cs + dy : cs + dy + c_h, cs + dx : cs + dx + c_w]
        total, squares = win.sum((1, 2)), np.square(win).sum((1, 2))
        win_norm[b_id] = np.sqrt(np.maximum(squares - total * total / size, 0)) + 1e-6
    found: dict[tuple[int, int, int], tuple[int, int]] = {}  # (i, j, transform) -> coarse best shift
    for t_id, t in enumerate(transforms):
        # a flipped or rotated copy is the nearest neighbour of the matching view: one is enough
        kt = k if not t_id else min(2, n)
        _, nbr = nn.kneighbors(_standardise(t(small)) @ basis, n_neighbors=kt)
        qi, qj = np.repeat(np.arange(n), kt), nbr.ravel()
        if not t_id:  # the identity finds each pair twice (i->j, j->i): score it once
            pairs = np.unique(np.stack([np.minimum(qi, qj), np.maximum(qi, qj)], 1), axis=0)
            qi, qj = pairs[:, 0], pairs[:, 1]
        ok = qi != qj
        qi, qj = qi[ok], qj[ok]
        for s in range(0, len(qi), 4096):
            ci, cj = qi[s : s + 4096], qj[s : s + 4096]
            query = _standardise(t(coarse[ci])[:, cs : cs + c_h, cs : cs + c_w])
            other = coarse[cj]
            corr = np.full(len(ci), -1.0, np.float32)
            best = np.zeros(len(ci), np.int64)
            for b_id, (dy, dx) in enumerate(shifts):
                win = other[:, cs + dy : cs + dy + c_h, cs + dx : cs + dx + c_w].reshape(len(cj), size)
                c = np.einsum("ij,ij->i", query, win) / win_norm[b_id, cj]
                better = c > corr
                corr[better], best[better] = c[better], b_id
            sel = corr >= coarse_min
            for i, j, b in zip(ci[sel], cj[sel], best[sel]):
                found.setdefault((int(i), int(j), t_id), shifts[b])

    # full resolution: the transformed query's centre against the other image at whole-pixel shifts
    # around the coarse best shift
    from numpy.lib.stride_tricks import sliding_window_view
    from scipy.ndimage import gaussian_filter

    m = min(max_shift + f, h // 4, w // 4)
    ch, cw = h - 2 * m, w - 2 * m
    min_corr, min_detail = float(dup_cfg["min_correlation"]), float(dup_cfg["min_detail_correlation"])
    best_corr: dict[tuple[int, int], float] = {}
    for (i, j, t_id), (dy, dx) in found.items():
        key = (min(i, j), max(i, j))
        if key in best_corr:
            continue
        gi = transforms[t_id](grey[i : i + 1])[0].astype(np.float32)
        gj = grey[j].astype(np.float32)
        a = _standardise(gi[None, m : h - m, m : w - m])[0]
        y0, y1 = max(-m, dy * f - f) + m, min(m, dy * f + f) + m
        x0, x1 = max(-m, dx * f - f) + m, min(m, dx * f + f) + m
        wins = sliding_window_view(gj[y0 : y1 + ch, x0 : x1 + cw], (ch, cw))
        corr = _standardise(wins.reshape(-1, ch * cw)) @ a
        b = int(corr.argmax())
        if corr[b] < min_corr:
            continue
        # same picture, or two look-alike cells? copies share their fine detail (texture, noise, sharp
        # edges) pixel for pixel; look-alikes share only the coarse shape
        by, bx = y0 + b // wins.shape[1], x0 + b % wins.shape[1]
        detail_i = gi - gaussian_filter(gi, 1.0)
        detail_j = gj - gaussian_filter(gj, 1.0)
        detail = float(
            _standardise(detail_i[None, m : h - m, m : w - m])[0]
            @ _standardise(detail_j[None, by : by + ch, bx : bx + cw])[0]
        )
        if detail >= min_detail:
            best_corr[key] = float(corr[b])
    return [(int(idx[i]), int(idx[j]), c) for (i, j), c in sorted(best_corr.items())]


# ------------------------------------------------------------------------------------------ find_unwanted


def _check_arrays(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(
            f"cleaning needs uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    if len(labels) != len(images):
        raise UserError(f"cleaning got {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def find_unwanted(
    images: np.ndarray, labels: np.ndarray, cleaning_cfg=None, *, seed: int = 0
) -> CleaningResult:
    """Decide which samples to remove; the arrays are not modified.

    ``cleaning_cfg`` is the ``cleaning`` config group (conf/cleaning/default.yaml), a plain dict with
    the same sections, or None for the defaults. ``seed`` only picks the pixel sample the stain plane
    is fitted on."""
    cfg = _resolve_cfg(cleaning_cfg)
    images, labels = _check_arrays(images, labels)
    n = len(images)
    reason = np.array([""] * n, dtype=object)
    score = np.zeros(n, np.float64)
    detail: dict[int, dict] = {}
    notes: list[str] = []
    if n == 0:
        return CleaningResult(np.ones(0, bool), [], {}, config=cfg)

    oc = cfg["outliers"]
    normal = fit_stain_plane(images, np.random.default_rng(seed))
    feats = image_features(images, normal, float(oc["plane_tolerance"]), int(oc["blocks"]))

    # corrupt: a truncated or garbled decode
    cc = cfg["corrupt"]
    corrupt = np.maximum(
        feats["repeated_rows"] / cc["max_repeated_rows"], feats["extreme_pixels"] / cc["max_extreme_pixels"]
    )
    hit = corrupt > 1.0
    reason[hit], score[hit] = "corrupt", corrupt[hit]
    for i in np.where(hit)[0]:
        detail[int(i)] = {
            "repeated_rows": round(float(feats["repeated_rows"][i]), 4),
            "extreme_pixels": round(float(feats["extreme_pixels"][i]), 4),
        }
    # a label that is no class id (the file readers refuse these; arrays handed in directly may have them)
    bad_label = (labels < 0) | (labels >= NUM_CLASSES)
    reason[bad_label], score[bad_label] = "corrupt", 1.0
    for i in np.where(bad_label)[0]:
        detail[int(i)] = {"bad_label": int(labels[i])}
    # flat: a blank frame (a real smear always shows cells and their edges)
    hit = (feats["grey_std"] < cfg["flat"]["min_std"]) & (reason == "")
    reason[hit], score[hit] = "flat", feats["grey_std"][hit]

    # outliers, measured against the bulk of what is left
    z_max = np.zeros(n)
    if oc["enabled"]:
        reference = reason == ""
        if reference.sum() < oc["min_samples"]:
            notes.append(
                f"outlier check skipped: {int(reference.sum())} samples, fewer than "
                f"outliers.min_samples={oc['min_samples']}"
            )
        else:
            names = list(_OUTLIER_FEATURES)
            z = np.stack([robust_z(feats[k], d, reference, m) for k, (d, m) in _OUTLIER_FEATURES.items()])
            # Classes look different (a platelet is a speck, a monocyte fills the frame): an image is odd
            # only if it is odd both against all images and against its own class, so a rare class is
            # never an outlier for being rare. Pollution carries random labels and is odd either way.
            for c in np.unique(labels):
                in_c = labels == c
                if (reference & in_c).sum() >= oc["min_class_samples"]:
                    zc = np.stack(
                        [
                            robust_z(feats[k][in_c], d, reference[in_c], m)
                            for k, (d, m) in _OUTLIER_FEATURES.items()
                        ]
                    )
                    z[:, in_c] = np.minimum(z[:, in_c], zc)
            z_max = z.max(0)
            which = z.argmax(0)
            hit = (z_max > oc["max_z"]) & (reason == "")
            reason[hit], score[hit] = "outlier", z_max[hit]
            for i in np.where(hit)[0]:
                detail[int(i)] = {"feature": names[which[i]]}

    # duplicates among what is left: exact copies by hash, near copies by correlation
    dc = cfg["duplicates"]
    cand = np.where(reason == "")[0]
    uf = _UnionFind(n)
    pair_corr: dict[int, float] = {}
    reps = cand
    if dc["exact"] and len(cand):
        first: dict[bytes, int] = {}
        for i in cand:
            key = hashlib.blake2b(images[i].tobytes(), digest_size=16).digest()
            if key in first:
                uf.union(first[key], int(i))
                pair_corr[int(i)] = 1.0
            else:
                first[key] = int(i)
        reps = np.array(sorted(first.values()), dtype=np.int64)
    if dc["near"] and len(reps) > 1:
        for i, j, c in near_duplicate_pairs(images, reps, dc):
            uf.union(i, j)
            pair_corr[i] = max(pair_corr.get(i, 0.0), c)
            pair_corr[j] = max(pair_corr.get(j, 0.0), c)
    members: dict[int, list[int]] = {}
    for i in cand:
        members.setdefault(uf.find(int(i)), []).append(int(i))
    groups = [sorted(g) for g in members.values() if len(g) > 1]
    groups.sort()
    group_of: dict[int, int] = {}
    for gid, g in enumerate(groups):
        counts = Counter(int(labels[i]) for i in g)
        for i in g:
            group_of[i] = gid
        if len(counts) == 1:
            drop, why = g[1:], "duplicate"
        else:
            ((top, top_n),) = counts.most_common(1)
            if dc["conflicting_labels"] == "keep_majority" and top_n * 2 > len(g):
                keeper = next(i for i in g if labels[i] == top)
                drop, why = [i for i in g if i != keeper], "conflicting_labels"
            else:
                drop, why = g, "conflicting_labels"
        for i in drop:
            reason[i], score[i] = why, pair_corr.get(i, 1.0)

    keep = reason == ""
    removed = []
    for i in np.where(~keep)[0]:
        entry = {
            "index": int(i),
            "label": int(labels[i]),
            "reason": str(reason[i]),
            "score": round(float(score[i]), 4),
        }
        if int(i) in group_of:
            entry["group"] = group_of[int(i)]
        entry.update(detail.get(int(i), {}))
        removed.append(entry)
    counts = {r: int((reason == r).sum()) for r in REASONS if (reason == r).any()}
    return CleaningResult(
        keep=keep,
        removed=removed,
        counts=counts,
        groups=groups,
        scores={"outlier_z": z_max},
        config=cfg,
        notes=notes,
    )


# ------------------------------------------------------------------------------------------------ report


def report_dict(result: CleaningResult, labels: np.ndarray, source: str | None = None) -> dict:
    """The JSON report: counts, settings, each removed sample (index, label, reason, score), groups."""
    labels = np.asarray(labels).reshape(-1)
    kept = result.keep
    return {
        "source": source,
        "n_input": int(len(kept)),
        "n_kept": int(kept.sum()),
        "n_removed": result.n_removed,
        "counts": result.counts,
        "removed_per_class": {
            CLASS_NAMES[c] if c < len(CLASS_NAMES) else str(c): int(v)
            for c, v in enumerate(np.bincount(labels[~kept], minlength=len(CLASS_NAMES)))
        },
        "config": result.config,
        "score_meaning": SCORE_MEANING,
        "notes": result.notes,
        "removed": result.removed,
        "duplicate_groups": result.groups,
    }


def contact_sheet(
    result: CleaningResult,
    images: np.ndarray,
    labels: np.ndarray,
    path: Path,
    per_reason: int = 60,
    columns: int = 15,
) -> Path:
    """A PNG of removed samples, one block per reason; duplicate groups sit side by side with their
    kept copy (framed green). Each tile is captioned with its index and label."""
    from PIL import Image, ImageDraw

    labels = np.asarray(labels).reshape(-1)
    tile, cap = 96, 12
    by_reason: dict[str, list[tuple[int, bool]]] = {}
    for e in result.removed:
        by_reason.setdefault(e["reason"], [])
    for reason in by_reason:
        if reason in ("duplicate", "conflicting_labels"):
            items: list[tuple[int, bool]] = []
            gids = sorted({e["group"] for e in result.removed if e["reason"] == reason})
            for g in gids:
                items += [(i, bool(result.keep[i])) for i in result.groups[g]]
        else:
            entries = sorted((e for e in result.removed if e["reason"] == reason), key=lambda e: -e["score"])
            items = [(e["index"], False) for e in entries]
        by_reason[reason] = items[:per_reason]
    header = 18
    height = (
        sum(header + ((len(v) + columns - 1) // columns) * (tile + cap) for v in by_reason.values()) or header
    )
    sheet = Image.new("RGB", (columns * tile, max(height, header)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    if not by_reason:
        draw.text((4, 3), "nothing removed", fill=(0, 0, 0))
    for reason, items in by_reason.items():
        total = result.counts.get(reason, 0)
        title = f"{reason}: {total} removed"
        if reason in ("duplicate", "conflicting_labels"):
            title += ", shown with their groups (green frame = the copy kept)"
        elif total > len(items):
            title += f" (the {len(items)} highest scores shown)"
        draw.text((4, y + 3), title, fill=(0, 0, 0))
        y += header
        for k, (i, kept) in enumerate(items):
            r, c = divmod(k, columns)
            im = Image.fromarray(images[i]).resize((tile, tile), Image.NEAREST)
            x0, y0 = c * tile, y + r * (tile + cap)
            sheet.paste(im, (x0, y0))
            if kept:
                draw.rectangle([x0, y0, x0 + tile - 1, y0 + tile - 1], outline=(0, 170, 0), width=3)
            name = CLASS_NAMES[labels[i]] if 0 <= labels[i] < len(CLASS_NAMES) else str(labels[i])
            draw.text((x0 + 2, y0 + tile), f"{i} {name[:9]}", fill=(0, 0, 0))
        y += ((len(items) + columns - 1) // columns) * (tile + cap)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def write_report(
    result: CleaningResult, images: np.ndarray, labels: np.ndarray, out_dir, source: str | None = None
) -> dict[str, Path]:
    """Write ``cleaning_report.json`` and ``cleaning_removed.png`` (contact sheet) into ``out_dir``;
    ``images`` and ``labels`` are the arrays the result was computed on. Returns {"json": ..., "png": ...}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "cleaning_report.json"
    json_path.write_text(json.dumps(report_dict(result, labels, source), indent=1))
    png_path = contact_sheet(result, images, labels, out_dir / "cleaning_removed.png")
    return {"json": json_path, "png": png_path}


def summary(result: CleaningResult) -> str:
    """One line of counts, e.g. 'removed 42 of 1000: outlier 30, duplicate 12'."""
    parts = ", ".join(f"{k} {v}" for k, v in result.counts.items()) or "nothing"
    return f"removed {result.n_removed} of {len(result.keep)}: {parts}"


# ----------------------------------------------------------------------------------- cache for training


def config_digest(cleaning_cfg) -> str:
    """A short hash of the resolved cleaning settings (part of the cache key)."""
    cfg = _resolve_cfg(cleaning_cfg)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def find_unwanted_cached(
    images: np.ndarray, labels: np.ndarray, cleaning_cfg, fingerprint: str, cache_dir
) -> tuple[CleaningResult, bool]:
    """:func:`find_unwanted`, remembered in ``cache_dir`` under the data fingerprint and the settings'
    digest, so that the trials of a sweep clean the same data once. Returns (result, from_cache)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"cleaning-{fingerprint[:16]}-{config_digest(cleaning_cfg)}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            keep = np.ones(saved["n_input"], bool)
            keep[[e["index"] for e in saved["removed"]]] = False
            if len(keep) == len(images):
                return CleaningResult(
                    keep=keep,
                    removed=saved["removed"],
                    counts=saved["counts"],
                    groups=saved["duplicate_groups"],
                    config=saved["config"],
                    notes=saved.get("notes", []),
                ), True
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    result = find_unwanted(images, labels, cleaning_cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report_dict(result, labels, fingerprint)))
    tmp.replace(path)
    return result, False


# -------------------------------------------------------------------------------------------------- CLI


def clean_file(cfg) -> dict[str, Path]:
    """What ``python -m bloodcell.clean`` does: read, find, write the cleaned npz and the report."""
    from bloodcell.data import read_folder, read_npz, resolve_path

    if not cfg.get("input"):
        raise UserError(
            "no input given; run python -m bloodcell.clean input=<file.npz or folder> output=<file.npz>"
        )
    if not cfg.get("output"):
        raise UserError("no output given; add output=<file.npz> (the input is never modified)")
    src = resolve_path(cfg.input)
    out = Path(str(cfg.output)).expanduser()
    if out.suffix != ".npz":
        raise UserError(f"output={out} must end in .npz (the competition layout)")
    if not src.exists():
        raise UserError(
            f"input {cfg.input} not found; give an .npz file or a folder with one sub-folder per class"
        )
    if out.resolve() == src.resolve():
        raise UserError(f"output {out} is the input; choose another file (the input is never modified)")
    if out.exists() and not cfg.get("overwrite", False):
        raise UserError(f"output {out} already exists; choose another name or add overwrite=true")
    _resolve_cfg(cfg.get("cleaning"))  # a bad setting is reported before the data is read
    images, labels = read_folder(src) if src.is_dir() else read_npz(src)
    print(f"cleaning {src}: {len(labels)} images", flush=True)
    result = find_unwanted(images, labels, cfg.get("cleaning"))
    report_dir = Path(str(cfg.report_dir)) if cfg.get("report_dir") else out.with_name(out.stem + "_cleaning")
    paths = write_report(result, images, labels, report_dir, source=str(src))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".partial.npz")
    np.savez(tmp, images=images[result.keep], labels=labels[result.keep].astype(np.uint8).reshape(-1, 1))
    tmp.replace(out)
    for note in result.notes:
        print(f"note: {note}")
    print(summary(result))
    print(
        f"wrote {out} ({int(result.keep.sum())} images), report {paths['json']}, contact sheet {paths['png']}"
    )
    return {"output": out, **paths}


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="clean")
def main(cfg: DictConfig) -> None:
    run_or_exit(clean_file, cfg)


if __name__ == "__main__":
    main()
