"""find_unwanted: run the checks in order (corrupt, flat, outlier, duplicates) and decide what goes; and
its cached form for training."""

from __future__ import annotations

import json
import logging
from collections import Counter
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


def _enough(reference: np.ndarray, check: str, min_samples: int, notes: list[str]) -> bool:
    """Whether enough samples are left for a check that measures against the bulk; else a note."""
    if reference.sum() >= min_samples:
        return True
    notes.append(
        f"{check} check skipped: {int(reference.sum())} samples, "
        f"fewer than outliers.min_samples={min_samples}"
    )
    return False


def embedding_outliers(
    images: np.ndarray,
    labels: np.ndarray,
    reference: np.ndarray,
    cfg: dict[str, Any],
    embedding_cache: str | Path | None,
    notes: list[str],
) -> tuple[np.ndarray, np.ndarray, dict[int, str], dict[str, np.ndarray]]:
    """The embedding check on the ``reference`` samples: (hit mask, score, where each hit was seen, the
    z-scores by name). Without a network (no weights) nothing is hit and a note says why."""
    ec, n = cfg["embedding"], len(images)
    hit, score = np.zeros(n, bool), np.zeros(n)
    where: dict[int, str] = {}
    feats, what = embed_cached(images, ec, Path(embedding_cache) if embedding_cache is not None else None)
    if feats is None:
        notes.append(f"{EMBEDDING_OFF}: {what}; the hand-made checks ran alone")
        log.warning("cleaning: %s", notes[-1])
        return hit, score, where, {}
    z_image, z_tiles = embedding_z(feats, labels, reference, ec, int(cfg["outliers"]["min_class_samples"]))
    image, spread, local = EMBEDDING_SCORES
    scores, worst = {image: z_image}, np.zeros(n, np.int64)
    if z_tiles is not None:
        scores[spread], scores[local], worst = tile_summary(z_tiles, int(ec["local_tiles"]))
    limits = {image: ec["max_z"], spread: ec["tile_mean_max_z"], local: ec["tile_local_max_z"]}
    flags = {k: z > limits[k] for k, z in scores.items()}
    hit = np.any(list(flags.values()), axis=0) & reference
    for i in np.where(hit)[0]:
        seen = next(k for k, f in flags.items() if f[i])  # the first score that flags it names it
        score[i] = scores[seen][i]
        r, c = divmod(int(worst[i]), int(ec["tiles"]))
        where[int(i)] = {image: "image", spread: "all tiles"}.get(
            seen, f"tiles, the worst at row {r} column {c}"
        )
    return hit, score, where, scores


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
    reason = np.array([""] * n, dtype=object)
    score = np.zeros(n, np.float64)
    detail: dict[int, dict] = {}
    notes: list[str] = []
    if n == 0:
        return CleaningResult(np.ones(0, bool), [], {}, config=cfg)

    oc, chunk = cfg["outliers"], int(cfg["compute"]["chunk"])
    normal = fit_stain_plane(
        images,
        np.random.default_rng(seed),
        n_pixels=int(oc["plane_fit_pixels"]),
        n_images=int(oc["plane_fit_images"]),
    )
    feats = image_features(
        images,
        normal,
        float(oc["plane_tolerance"]),
        int(oc["blocks"]),
        centre_radius=float(oc["centre_radius"]),
        border_radius=float(oc["border_radius"]),
        darkest_quantile=float(oc["darkest_quantile"]),
        chunk=chunk,
    )

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
        if _enough(reference, "outlier", oc["min_samples"], notes):
            z, names = feature_z(feats, labels, reference, oc)
            z_max = z.max(0)
            which = z.argmax(0)
            hit = (z_max > oc["max_z"]) & (reason == "")
            reason[hit], score[hit] = "outlier", z_max[hit]
            for i in np.where(hit)[0]:
                detail[int(i)] = {"feature": names[which[i]]}

    # duplicates among what is left: exact copies by hash, near copies by correlation
    dc = cfg["duplicates"]
    groups, pair_corr = duplicate_groups(
        images, np.where(reason == "")[0], dc, chunk, int(cfg["compute"]["pair_chunk"])
    )
    group_of: dict[int, int] = {}
    for gid, g in enumerate(groups):
        label_counts = Counter(int(labels[i]) for i in g)
        for i in g:
            group_of[i] = gid
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
            reason[i], score[i] = why, pair_corr.get(i, 1.0)

    # embedding outliers, against the bulk of what is left: what a network sees, whole image and tiles.
    # After the duplicates, so that a copy is judged as a copy (its group's labels decide what stays), as
    # before this check existed
    embedding_scores = {k: np.zeros(n) for k in EMBEDDING_SCORES}  # 0 where the check did not run
    if cfg["embedding"]["enabled"]:
        reference = reason == ""
        if _enough(reference, "embedding", oc["min_samples"], notes):
            hit, hit_score, where, found = embedding_outliers(
                images, labels, reference, cfg, embedding_cache, notes
            )
            embedding_scores.update(found)
            reason[hit], score[hit] = "embedding_outlier", hit_score[hit]
            detail.update({int(i): {"where": where[int(i)]} for i in np.where(hit)[0]})

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
        scores={"outlier_z": z_max, **embedding_scores},
        config=cfg,
        notes=notes,
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
