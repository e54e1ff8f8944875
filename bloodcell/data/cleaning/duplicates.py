"""Duplicates: exact copies by byte hash; near copies (re-encoded, shifted by a few pixels, recoloured,
flipped or rotated) by nearest neighbours on a small normalised grey thumbnail, confirmed at full
resolution by the best correlation over small shifts and by the correlation of their fine detail (a copy
shares its texture pixel for pixel, a look-alike cell does not)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bloodcell.data.cleaning.config import defaults
from bloodcell.data.cleaning.features import grey, pool


def _standardise(a: np.ndarray) -> np.ndarray:
    """Rows to zero mean and unit norm: correlation becomes a dot product, and brightness, contrast and
    (on grey) most recolouring drop out."""
    a = a.reshape(len(a), -1)
    a = a - a.mean(1, keepdims=True, dtype=np.float32)
    a /= np.sqrt(np.einsum("ij,ij->i", a, a))[:, None] + 1e-6
    return a.astype(np.float32, copy=False)


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
    images: np.ndarray,
    candidates: np.ndarray,
    dup_cfg: Mapping[str, Any],
    chunk: int = 512,
    pair_chunk: int = 4096,
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, correlation) of near copies among ``images[candidates]`` (indices into images).

    Three steps, each cheap enough for the next: the nearest neighbours of a small standardised grey
    thumbnail (tolerant of a few pixels of shift, of JPEG noise and of recolouring); the best correlation
    of coarser thumbnails over small shifts (keeps pairs above ``coarse_correlation``); and the best
    correlation at full resolution over whole-pixel shifts up to ``max_shift`` around the coarse best,
    which must reach ``min_correlation``. Full resolution is what separates a re-encoded or shifted copy
    (it lines up pixel for pixel) from a different cell that merely looks alike. ``dup_cfg`` is the
    ``duplicates`` section (missing keys: conf/cleaning/default.yaml)."""
    dup_cfg = {**defaults()["duplicates"], **dup_cfg}
    idx = np.asarray(candidates)
    if len(idx) < 2:
        return []
    views = _Thumbnails.of(images, idx, dup_cfg, chunk)
    found = _coarse_matches(views, dup_cfg, pair_chunk)
    best_corr = _confirmed_at_full_resolution(views, found, dup_cfg)
    return [(int(idx[i]), int(idx[j]), c) for (i, j), c in sorted(best_corr.items())]


@dataclass
class _Thumbnails:
    """The candidates' grey images (uint8: a quarter of the memory) and two pooled thumbnails: ``small``
    for the neighbour search, ``coarse`` (pooled by ``factor``) for the shifted correlations."""

    grey: np.ndarray
    small: np.ndarray
    coarse: np.ndarray
    factor: int
    transforms: tuple[Any, ...]

    @classmethod
    def of(cls, images: np.ndarray, idx: np.ndarray, dup_cfg: Mapping[str, Any], chunk: int) -> _Thumbnails:
        n, h, w = len(idx), images.shape[1], images.shape[2]
        f = max(1, int(round(h / int(dup_cfg["coarse_size"]))))
        fs = max(1, h // int(dup_cfg["thumbnail"]))
        grey_u8 = np.empty((n, h, w), np.uint8)
        small = np.empty((n, h // fs, w // fs), np.float32)
        coarse = np.empty((n, h // f, w // f), np.float32)
        for s in range(0, n, chunk):  # pooled chunk by chunk
            g = grey(images[idx[s : s + chunk]])
            grey_u8[s : s + chunk] = np.rint(g).astype(np.uint8)
            small[s : s + chunk] = pool(g, fs)
            coarse[s : s + chunk] = pool(g, f)
        transforms = _DIHEDRAL if dup_cfg["match_flips"] and h == w else _DIHEDRAL[:1]
        return cls(grey_u8, small, coarse, f, transforms)


def _coarse_matches(
    views: _Thumbnails, dup_cfg: Mapping[str, Any], pair_chunk: int
) -> dict[tuple[int, int, int], tuple[int, int]]:
    """Steps 1 and 2: each candidate's nearest thumbnails (in every flip and rotation asked for), kept when
    their coarse thumbnails correlate above ``coarse_correlation`` at some small shift. Returns
    (i, j, transform) -> the best coarse shift."""
    from sklearn.neighbors import NearestNeighbors

    small, coarse, f = views.small, views.coarse, views.factor
    n = len(small)
    cs = min(int(np.ceil(int(dup_cfg["max_shift"]) / f)), coarse.shape[1] // 4, coarse.shape[2] // 4)
    c_h, c_w = coarse.shape[1] - 2 * cs, coarse.shape[2] - 2 * cs
    k = min(int(dup_cfg["neighbours"]) + 1, n)
    # neighbours in the thumbnails' leading principal directions: cheaper than all pixels and, for
    # candidates that a finer test then confirms, as good
    index = _standardise(small)
    sample = index[:: max(1, n // int(dup_cfg["pca_samples"]))]
    basis = np.linalg.svd(sample, full_matrices=False)[2][: int(dup_cfg["thumbnail_components"])].T.copy()
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
    found: dict[tuple[int, int, int], tuple[int, int]] = {}
    for t_id, t in enumerate(views.transforms):
        # a flipped or rotated copy is the nearest neighbour of the matching view: one is enough
        kt = k if not t_id else min(2, n)
        _, nbr = nn.kneighbors(_standardise(t(small)) @ basis, n_neighbors=kt)
        qi, qj = np.repeat(np.arange(n), kt), nbr.ravel()
        if not t_id:  # the identity finds each pair twice (i->j, j->i): score it once
            pairs = np.unique(np.stack([np.minimum(qi, qj), np.maximum(qi, qj)], 1), axis=0)
            qi, qj = pairs[:, 0], pairs[:, 1]
        ok = qi != qj
        qi, qj = qi[ok], qj[ok]
        for s in range(0, len(qi), pair_chunk):
            ci, cj = qi[s : s + pair_chunk], qj[s : s + pair_chunk]
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
    return found


def _confirmed_at_full_resolution(
    views: _Thumbnails, found: dict[tuple[int, int, int], tuple[int, int]], dup_cfg: Mapping[str, Any]
) -> dict[tuple[int, int], float]:
    """Step 3: the transformed query's centre against the other image at whole-pixel shifts around the
    coarse best shift; a pair is kept when that correlation reaches ``min_correlation`` and their fine
    detail correlates too (``min_detail_correlation``). Returns (i, j) -> the best correlation."""
    from numpy.lib.stride_tricks import sliding_window_view
    from scipy.ndimage import gaussian_filter

    grey_u8, f, transforms = views.grey, views.factor, views.transforms
    h, w = grey_u8.shape[1], grey_u8.shape[2]
    m = min(int(dup_cfg["max_shift"]) + f, h // 4, w // 4)
    ch, cw = h - 2 * m, w - 2 * m
    min_corr, min_detail = float(dup_cfg["min_correlation"]), float(dup_cfg["min_detail_correlation"])
    sigma = float(dup_cfg["detail_sigma"])
    best_corr: dict[tuple[int, int], float] = {}
    for (i, j, t_id), (dy, dx) in found.items():
        key = (min(i, j), max(i, j))
        if key in best_corr:
            continue
        gi = transforms[t_id](grey_u8[i : i + 1])[0].astype(np.float32)
        gj = grey_u8[j].astype(np.float32)
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
        detail_i = gi - gaussian_filter(gi, sigma)
        detail_j = gj - gaussian_filter(gj, sigma)
        detail = float(
            _standardise(detail_i[None, m : h - m, m : w - m])[0]
            @ _standardise(detail_j[None, by : by + ch, bx : bx + cw])[0]
        )
        if detail >= min_detail:
            best_corr[key] = float(corr[b])
    return best_corr


def duplicate_groups(
    images: np.ndarray,
    candidates: np.ndarray,
    dup_cfg: Mapping[str, Any],
    chunk: int = 512,
    pair_chunk: int = 4096,
) -> tuple[list[list[int]], dict[int, float]]:
    """Groups (sorted, size >= 2) of copies among ``images[candidates]``, exact ones by hash and near ones
    by :func:`near_duplicate_pairs`, and each grouped sample's best correlation with another member."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    cand = np.asarray(candidates, dtype=np.int64)
    edges: list[tuple[int, int]] = []
    pair_corr: dict[int, float] = {}
    reps = cand
    if dup_cfg["exact"] and len(cand):
        first: dict[bytes, int] = {}
        for i in cand:
            key = hashlib.blake2b(images[i].tobytes(), digest_size=16).digest()
            if key in first:
                edges.append((first[key], int(i)))
                pair_corr[int(i)] = 1.0
            else:
                first[key] = int(i)
        reps = np.array(sorted(first.values()), dtype=np.int64)
    if dup_cfg["near"] and len(reps) > 1:
        for i, j, c in near_duplicate_pairs(images, reps, dup_cfg, chunk, pair_chunk):
            edges.append((i, j))
            pair_corr[i] = max(pair_corr.get(i, 0.0), c)
            pair_corr[j] = max(pair_corr.get(j, 0.0), c)
    if not edges:
        return [], pair_corr
    # copies of copies are one group: the connected components of the "is a copy of" graph
    i, j = np.array(edges).T
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(len(images), len(images)))
    _, component = connected_components(graph, directed=False)
    members: dict[int, list[int]] = {}
    for k in cand:
        members.setdefault(int(component[k]), []).append(int(k))
    groups = sorted(sorted(g) for g in members.values() if len(g) > 1)
    return groups, pair_corr
