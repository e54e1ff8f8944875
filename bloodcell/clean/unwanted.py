"""find_unwanted: run the checks in order (corrupt, flat, outlier, duplicates) and decide what goes; and
its cached form for training."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bloodcell import NUM_CLASSES
from bloodcell.clean.config import config_digest, resolve_cfg
from bloodcell.clean.duplicates import duplicate_groups
from bloodcell.clean.features import feature_z, fit_stain_plane, image_features
from bloodcell.clean.report import report_dict
from bloodcell.clean.result import REASONS, CleaningResult
from bloodcell.errors import UserError


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


def find_unwanted(
    images: np.ndarray, labels: np.ndarray, cleaning_cfg: Any = None, *, seed: int = 0
) -> CleaningResult:
    """Decide which samples to remove; the arrays are not modified.

    ``cleaning_cfg`` is the ``cleaning`` config group (conf/cleaning/default.yaml), a plain dict with
    some of its sections, or None for the file's values. ``seed`` only picks the pixel sample the stain
    plane is fitted on."""
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
        if reference.sum() < oc["min_samples"]:
            notes.append(
                f"outlier check skipped: {int(reference.sum())} samples, fewer than "
                f"outliers.min_samples={oc['min_samples']}"
            )
        else:
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


def find_unwanted_cached(
    images: np.ndarray, labels: np.ndarray, cleaning_cfg: Any, fingerprint: str, cache_dir: str | Path
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
