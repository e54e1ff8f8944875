"""Find and remove the unwanted samples of a training set: duplicates, near duplicates, duplicate groups
with conflicting labels, and images that are not stained single-cell smears at all (pasted or blended
pictures, blank or flat frames, corrupt data).

Nothing here is told what the pollution looks like. Every test is relative to the data set itself:

* **corrupt / flat** -- cheap per-image rules: long runs of identical rows (a truncated decode), many
  pure black or pure white pixels, a label that is no class id; almost no grey-level variation.
* **outlier** (``features``) -- each image is described by a few numbers that say what a stained smear
  looks like (off-stain colours overall and in its worst tile, colour cast, contrast, darkest stain, fine
  texture, seams, centre against border). Each number becomes a robust z-score against the bulk of the
  data -- against all images and against the image's own class, the smaller counting -- and an image
  whose largest z-score passes ``outliers.max_z`` is removed.
* **duplicate / conflicting_labels** (``duplicates``) -- exact copies by byte hash; near copies
  (re-encoded, shifted, recoloured, flipped or rotated) confirmed at full resolution. A group whose labels
  agree keeps one copy; a group whose labels conflict is dropped whole (``conflicting_labels:
  drop_group``) or keeps one copy of a strict majority label (``keep_majority``).
* **embedding_outlier** (``embedding``) -- a second outlier score from what a pretrained network (or the
  project's trained model) sees: the channel means and covariances of an early layer over the whole
  image (Local Outlier Factor), and the channel means and spreads of an earlier layer in each tile of a
  4 x 4 grid, each tile against the same tile of the other images (distance to its nearest neighbours);
  an image whose whole-image z, mean tile z (a picture blended over it) or worst tiles' z (a patch)
  passes its threshold is removed. Off, with a note, when no weights are at hand.

Every setting is in conf/cleaning/default.yaml (``config``), the only place the defaults live.

Library use (what training calls when ``data.clean=true``)::

    result = find_unwanted(images, labels, cfg.cleaning)      # or find_unwanted_cached(..., fingerprint, dir)
    write_report(result, images, labels, out_dir)             # JSON + contact sheet of what goes
    images, labels = images[result.keep], labels[result.keep]

Command line (``bloodcell/clean.py``)::

    python -m bloodcell.clean input=data/training_set.npz output=data/training_set_clean.npz
"""

from __future__ import annotations

from typing import Any

from bloodcell.data.cleaning.config import DEFAULTS_FILE, config_digest, defaults, resolve_cfg
from bloodcell.data.cleaning.duplicates import duplicate_groups, near_duplicate_pairs
from bloodcell.data.cleaning.embedding import embed, embedding_z, resolve_weights
from bloodcell.data.cleaning.features import fit_stain_plane, image_features, robust_z
from bloodcell.data.cleaning.report import contact_sheet, report_dict, summary, write_report
from bloodcell.data.cleaning.result import REASONS, SCORE_MEANING, CleaningResult
from bloodcell.data.cleaning.unwanted import embedding_cache_path, find_unwanted, find_unwanted_cached

__all__ = [
    "DEFAULTS",
    "DEFAULTS_FILE",
    "REASONS",
    "SCORE_MEANING",
    "CleaningResult",
    "config_digest",
    "contact_sheet",
    "defaults",
    "duplicate_groups",
    "embed",
    "embedding_cache_path",
    "embedding_z",
    "find_unwanted",
    "find_unwanted_cached",
    "fit_stain_plane",
    "image_features",
    "near_duplicate_pairs",
    "report_dict",
    "resolve_cfg",
    "resolve_weights",
    "robust_z",
    "summary",
    "write_report",
]


def __getattr__(name: str) -> Any:
    # DEFAULTS: conf/cleaning/default.yaml as a dict, read when first asked for (a copy, so no caller
    # can change another's defaults).
    if name == "DEFAULTS":
        return defaults()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
