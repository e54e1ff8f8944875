"""find_unwanted: run the detectors in order (bad labels and corrupt pixels, flat frames, feature outliers,
duplicates, embedding outliers), each on what the earlier ones left, and merge what they flag; and its
cached form for training."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bloodcell import NUM_CLASSES
from bloodcell.core.errors import UserError
from bloodcell.data.cleaning.config import config_digest, resolve_cfg
from bloodcell.data.cleaning.duplicates import duplicate_groups
from bloodcell.data.cleaning.embedding import embed_cached, embedding_z, network_digest, tile_summary
from bloodcell.data.cleaning.features import feature_z, fit_stain_plane, image_features
from bloodcell.data.cleaning.report import report_dict
from bloodcell.data.cleaning.result import REASONS, CleaningResult

log = logging.getLogger(__name__)

#: How the note that the embedding score did not run begins (in the report, and logged once).
EMBEDDING_OFF = "embedding score off"
#: The z-scores of the embedding check in ``CleaningResult.scores``: whole image, mean over the tiles, mean
#: of the worst tiles.
EMBEDDING_SCORES = ("embedding_z", "embedding_tiles_mean_z", "embedding_tiles_local_z")


def check_arrays(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, 3) and N integer labels, or a user error that says what is wrong."""
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(
            f"cleaning needs uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    if len(labels) != len(images):
        raise UserError(f"cleaning got {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


@dataclass
class Data:
    """What every detector looks at: the images, their labels, the hand-made features of each image
    (``features.image_features``), the resolved settings, and where the network's features are cached."""

    images: np.ndarray
    labels: np.ndarray
    features: dict[str, np.ndarray]
    cfg: dict[str, Any]
    embedding_cache: Path | None = None


@dataclass
class Flags:
    """What one detector flags: ``hit`` (a mask over all images), each hit's ``score`` and ``reason`` (one
    for all, or one per image), details by image index, whole score series for ``CleaningResult.scores``,
    duplicate groups and notes."""

    hit: np.ndarray
    score: np.ndarray
    reason: str | np.ndarray
    detail: dict[int, dict[str, Any]] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    groups: list[list[int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _none(n: int, reason: str, **found: Any) -> Flags:
    return Flags(np.zeros(n, bool), np.zeros(n), reason, **found)


def _enough(left: np.ndarray, check: str, cfg: dict[str, Any]) -> str | None:
    """None when enough samples are left for a check that measures against the bulk; else the note."""
    min_samples = cfg["outliers"]["min_samples"]
    if left.sum() >= min_samples:
        return None
    return f"{check} check skipped: {int(left.sum())} samples, fewer than outliers.min_samples={min_samples}"


# ------------------------------------------------------------------------------------- the detectors
# Each takes the data and the mask of the images no earlier detector flagged (``left``), and says which
# images it flags; find_unwanted keeps, for each image, the first detector's verdict.


def bad_labels(data: Data, left: np.ndarray) -> Flags:
    """corrupt: a label that is no class id (the file readers refuse these; arrays handed in directly may
    have them)."""
    labels = data.labels
    hit = (labels < 0) | (labels >= NUM_CLASSES)
    detail = {int(i): {"bad_label": int(labels[i])} for i in np.where(hit)[0]}
    return Flags(hit, hit.astype(np.float64), "corrupt", detail)


def corrupt_pixels(data: Data, left: np.ndarray) -> Flags:
    """corrupt: a truncated or garbled decode (repeated rows, pure black or white pixels)."""
    feats, cc = data.features, data.cfg["corrupt"]
    ratio = np.maximum(
        feats["repeated_rows"] / cc["max_repeated_rows"], feats["extreme_pixels"] / cc["max_extreme_pixels"]
    )
    hit = ratio > 1.0
    detail = {
        int(i): {
            "repeated_rows": round(float(feats["repeated_rows"][i]), 4),
            "extreme_pixels": round(float(feats["extreme_pixels"][i]), 4),
        }
        for i in np.where(hit)[0]
    }
    return Flags(hit, ratio, "corrupt", detail)


def flat_frames(data: Data, left: np.ndarray) -> Flags:
    """flat: a blank frame (a real smear always shows cells and their edges)."""
    grey_std = data.features["grey_std"]
    return Flags(grey_std < data.cfg["flat"]["min_std"], grey_std, "flat")


def feature_outliers(data: Data, left: np.ndarray) -> Flags:
    """outlier: an image whose hand-made features lie far from the bulk of what is left (all images and
    its own class)."""
    oc, n = data.cfg["outliers"], len(data.images)
    flags = _none(n, "outlier", scores={"outlier_z": np.zeros(n)})  # 0 where the check did not run
    if not oc["enabled"]:
        return flags
    note = _enough(left, "outlier", data.cfg)
    if note:
        flags.notes.append(note)
        return flags
    z, names = feature_z(data.features, data.labels, left, oc)
    z_max, which = z.max(0), z.argmax(0)
    hit = z_max > oc["max_z"]
    detail = {int(i): {"feature": names[which[i]]} for i in np.where(hit & left)[0]}
    return Flags(hit, z_max, "outlier", detail, scores={"outlier_z": z_max})


def duplicates(data: Data, left: np.ndarray) -> Flags:
    """duplicate / conflicting_labels: exact copies by hash and near copies by correlation among what is
    left; a group whose labels agree keeps one copy, one whose labels conflict is dropped whole or keeps
    one copy of a strict majority label (``duplicates.conflicting_labels``)."""
    cfg, labels, n = data.cfg, data.labels, len(data.images)
    dc = cfg["duplicates"]
    groups, pair_corr = duplicate_groups(
        data.images, np.where(left)[0], dc, int(cfg["compute"]["chunk"]), int(cfg["compute"]["pair_chunk"])
    )
    flags = _none(n, "", groups=groups)
    reason = np.array([""] * n, dtype=object)
    for g in groups:
        label_counts = Counter(int(labels[i]) for i in g)
        if len(label_counts) == 1:
            drop, why = g[1:], "duplicate"
        else:
            ((top, top_n),) = label_counts.most_common(1)
            if dc["conflicting_labels"] == "keep_majority" and top_n * 2 > len(g):
                keeper = next(i for i in g if labels[i] == top)
                drop, why = [i for i in g if i != keeper], "conflicting_labels"
            else:
                drop, why = g, "conflicting_labels"
        for i in drop:
            flags.hit[i], flags.score[i], reason[i] = True, pair_corr.get(i, 1.0), why
    flags.reason = reason
    return flags


def embedding_outliers(data: Data, left: np.ndarray) -> Flags:
    """embedding_outlier: what a network sees, whole image and tiles, odd against the bulk of what is
    left. After the duplicates, so that a copy is judged as a copy (its group's labels decide what
    stays), as before this check existed. Without a network (no weights) nothing is flagged and a note
    says why."""
    cfg, n = data.cfg, len(data.images)
    ec = cfg["embedding"]
    flags = _none(n, "embedding_outlier", scores={k: np.zeros(n) for k in EMBEDDING_SCORES})
    if not ec["enabled"]:
        return flags
    note = _enough(left, "embedding", cfg)
    if note:
        flags.notes.append(note)
        return flags
    feats, what = embed_cached(data.images, ec, data.embedding_cache)
    if feats is None:
        flags.notes.append(f"{EMBEDDING_OFF}: {what}; the hand-made checks ran alone")
        log.warning("cleaning: %s", flags.notes[-1])
        return flags
    z_image, z_tiles = embedding_z(feats, data.labels, left, ec, int(cfg["outliers"]["min_class_samples"]))
    image, spread, local = EMBEDDING_SCORES
    scores, worst = {image: z_image}, np.zeros(n, np.int64)
    if z_tiles is not None:
        scores[spread], scores[local], worst = tile_summary(z_tiles, int(ec["local_tiles"]))
    limits = {image: ec["max_z"], spread: ec["tile_mean_max_z"], local: ec["tile_local_max_z"]}
    seen_by = {k: z > limits[k] for k, z in scores.items()}
    flags.hit = np.any(list(seen_by.values()), axis=0) & left
    for i in np.where(flags.hit)[0]:
        seen = next(k for k, f in seen_by.items() if f[i])  # the first score that flags it names it
        flags.score[i] = scores[seen][i]
        r, c = divmod(int(worst[i]), int(ec["tiles"]))
        where = {image: "image", spread: "all tiles"}.get(seen, f"tiles, the worst at row {r} column {c}")
        flags.detail[int(i)] = {"where": where}
    flags.scores.update(scores)
    return flags


Detector = Callable[[Data, np.ndarray], Flags]

#: The checks in the order they run: an image gets the first verdict that flags it (REASONS' order), and
#: the checks that measure against the bulk see only what the earlier ones left.
DETECTORS: tuple[Detector, ...] = (
    bad_labels,
    corrupt_pixels,
    flat_frames,
    feature_outliers,
    duplicates,
    embedding_outliers,
)


def find_unwanted(
    images: np.ndarray,
    labels: np.ndarray,
    cleaning_cfg: Any = None,
    *,
    seed: int = 0,
    embedding_cache: str | Path | None = None,
) -> CleaningResult:
    """Decide which samples to remove; the arrays are not modified.

    ``cleaning_cfg`` is the ``cleaning`` config group (conf/cleaning/default.yaml), a plain dict with
    some of its sections, or None for the file's values. ``seed`` only picks the pixel sample the stain
    plane is fitted on. ``embedding_cache``: an .npz file that keeps the network's features of exactly
    these images with these network settings (see :func:`embedding_cache_path`), so that other
    thresholds re-score without running the network."""
    cfg = resolve_cfg(cleaning_cfg)
    images, labels = check_arrays(images, labels)
    n = len(images)
    if n == 0:
        return CleaningResult(np.ones(0, bool), [], {}, config=cfg)
    cache = Path(embedding_cache) if embedding_cache is not None else None
    data = Data(images, labels, _features(images, cfg, seed), cfg, cache)
    reason = np.array([""] * n, dtype=object)
    score = np.zeros(n, np.float64)
    detail: dict[int, dict] = {}
    scores: dict[str, np.ndarray] = {}
    groups: list[list[int]] = []
    notes: list[str] = []
    for detector in DETECTORS:
        flags = detector(data, reason == "")
        new = flags.hit & (reason == "")
        reason[new] = flags.reason[new] if isinstance(flags.reason, np.ndarray) else flags.reason
        score[new] = flags.score[new]
        detail.update({i: d for i, d in flags.detail.items() if new[i]})
        scores.update(flags.scores)
        groups += flags.groups
        notes += flags.notes
    keep = reason == ""
    group_of = {i: gid for gid, g in enumerate(groups) for i in g}  # a removed member names its group
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
        removed.append(entry | detail.get(int(i), {}))
    counts = {r: int((reason == r).sum()) for r in REASONS if (reason == r).any()}
    return CleaningResult(keep, removed, counts, groups=groups, scores=scores, config=cfg, notes=notes)


def _features(images: np.ndarray, cfg: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """The hand-made features of every image, against the stain plane fitted on a sample of the pixels."""
    oc = cfg["outliers"]
    normal = fit_stain_plane(
        images,
        np.random.default_rng(seed),
        n_pixels=int(oc["plane_fit_pixels"]),
        n_images=int(oc["plane_fit_images"]),
    )
    return image_features(
        images,
        normal,
        float(oc["plane_tolerance"]),
        int(oc["blocks"]),
        centre_radius=float(oc["centre_radius"]),
        border_radius=float(oc["border_radius"]),
        darkest_quantile=float(oc["darkest_quantile"]),
        chunk=int(cfg["compute"]["chunk"]),
    )


def embedding_cache_path(cache_dir: str | Path, fingerprint: str, cleaning_cfg: Any) -> Path:
    """Where the network's features of the data named by ``fingerprint`` are kept in ``cache_dir``."""
    digest = network_digest(resolve_cfg(cleaning_cfg)["embedding"])
    return Path(cache_dir) / f"embedding-{fingerprint[:16]}-{digest}.npz"


def find_unwanted_cached(
    images: np.ndarray, labels: np.ndarray, cleaning_cfg: Any, fingerprint: str, cache_dir: str | Path
) -> tuple[CleaningResult, bool]:
    """:func:`find_unwanted`, remembered in ``cache_dir`` under the data fingerprint and the settings'
    digest, so that the trials of a sweep clean the same data once (a hit runs neither the checks nor the
    network), and the network's features beside it, so that other cleaning thresholds need no second
    pass through the network. Returns (result, from_cache)."""
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
    result = find_unwanted(
        images,
        labels,
        cleaning_cfg,
        embedding_cache=embedding_cache_path(cache_dir, fingerprint, cleaning_cfg),
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report_dict(result, labels, fingerprint)))
    tmp.replace(path)
    return result, False
