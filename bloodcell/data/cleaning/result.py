"""What cleaning decides: the reasons a sample can be removed for, and the result object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Reasons, in the order the checks run (an image gets the first reason that applies).
REASONS: tuple[str, ...] = (
    "corrupt",
    "flat",
    "outlier",
    "duplicate",
    "conflicting_labels",
    "embedding_outlier",
)

#: What the ``score`` of a removed sample measures, per reason (also written into the JSON report).
SCORE_MEANING: dict[str, str] = {
    "corrupt": "worst of the repeated-row and black/white-pixel fractions, as a multiple of its limit "
    "(1.0 for a bad label)",
    "flat": "grey-level standard deviation (0-255)",
    "outlier": "largest robust z-score of its features (see 'feature')",
    "embedding_outlier": "robust z-score of its embedding statistics, of the whole image or of its worst "
    "tile (see 'where')",
    "duplicate": "correlation with its closest copy (1.0 = identical pixels)",
    "conflicting_labels": "correlation with its closest copy (1.0 = identical pixels)",
}


@dataclass
class CleaningResult:
    """What :func:`find_unwanted` decided.

    ``keep`` is a boolean mask over the input; ``removed`` one dict per removed sample (``index``,
    ``label``, ``reason``, ``score`` and, for duplicates, ``group``: the group's id); ``counts`` the number
    removed per reason; ``groups`` every duplicate group found (all members, kept ones included)."""

    keep: np.ndarray
    removed: list[dict[str, Any]]
    counts: dict[str, int]
    groups: list[list[int]] = field(default_factory=list)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def n_removed(self) -> int:
        return int((~self.keep).sum())
