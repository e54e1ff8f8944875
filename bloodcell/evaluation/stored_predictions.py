"""The per-image predictions every run keeps (``predictions/<split>.npz``): reading them, the images two
runs' splits share, and whether runs are comparable at all (same data, same split) before any is loaded.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bloodcell.core.errors import UserError
from bloodcell.evaluation.candidates import Candidate

if TYPE_CHECKING:
    pass
log = logging.getLogger("bloodcell.compare")


SPLITS = ("test", "val")


@dataclass
class Predictions:
    """One model's class probabilities on a set of images."""

    labels: np.ndarray  # (N,) int64
    probabilities: np.ndarray  # (N, 8) float32
    #: position of each image in the data set the split was cut from (stored predictions), or in eval=
    data_index: np.ndarray
    #: position of each image within the split (stored predictions), or in eval=
    index: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)


def stored_predictions(client: Any, run_id: str, split: str = "test") -> Predictions | None:
    """A run's ``predictions/<split>.npz``; None when it has none (a run from before they were kept)."""
    import os

    import mlflow

    from bloodcell.tracking import predictions_path

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a file of kilobytes
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=predictions_path(split),
                dst_path=tmp,
                tracking_uri=client.tracking_uri,
            )
        except Exception:  # no such artifact (MLflow raises several kinds)
            return None
        with np.load(path, allow_pickle=False) as npz:
            return Predictions(
                npz["labels"].astype(np.int64),
                npz["probabilities"].astype(np.float32),
                npz["data_index"].astype(np.int64),
                npz["index"].astype(np.int64),
            )


def required_predictions(
    client: Any, run_id: str, split: str, fix: str, name: str | None = None
) -> Predictions:
    """`stored_predictions`, or one line saying the run kept none and what to do instead (``fix``)."""
    stored = stored_predictions(client, run_id, split)
    if stored is None:
        what = {"val": "validation"}.get(split, split)
        raise UserError(
            f"run {name or run_id} kept no {what} predictions (trained before runs kept them): {fix}"
        )
    return stored


def shared_images(predictions: list[Predictions]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The images every prediction set covers (by position in the common data set), and for each set the
    rows of those images, in the first set's order."""
    common = predictions[0].data_index
    for p in predictions[1:]:
        common = common[np.isin(common, p.data_index)]
    rows = []
    for p in predictions:
        where = {int(d): i for i, d in enumerate(p.data_index)}
        rows.append(np.array([where[int(d)] for d in common], dtype=np.int64))
    labels = [p.labels[r] for p, r in zip(predictions, rows)]
    if any(not np.array_equal(labels[0], other) for other in labels[1:]):
        raise UserError(
            "the runs' stored predictions disagree on the labels of the same images: they were not trained "
            "on the same data, whatever their fingerprints say"
        )
    return common, rows


def comparable(models: list[Candidate], split: str, allow_different: bool, on_eval: bool) -> str:
    """Whether the models can be compared image by image; raises a one-line UserError when not (unless
    ``allow_different``). Returns how: 'same split', 'shared images' (same data, other splits) or 'eval'."""
    first = models[0]
    other_data = [m for m in models[1:] if m.data_fingerprint != first.data_fingerprint]
    if other_data:
        m = other_data[0]
        what = (
            f"runs {first.name} and {m.name} were trained on different data: {first.name} on "
            f"{first.tags.get('data_source', '?')} (fingerprint {first.data_fingerprint[:12] or '?'}), "
            f"{m.name} on {m.tags.get('data_source', '?')} (fingerprint {m.data_fingerprint[:12] or '?'})"
        )
        if not on_eval:
            raise UserError(
                f"{what}; they share no {split} images: compare them on labelled images with "
                "eval=<npz or folder> allow_different=true"
            )
        if not allow_different:
            raise UserError(
                f"{what}; either may have trained on some of the eval images: pass allow_different=true to "
                "compare them there anyway"
            )
        return "eval"
    if on_eval:
        return "eval"
    other_split = [m for m in models[1:] if m.split_fingerprint != first.split_fingerprint]
    if other_split:
        m = other_split[0]
        seeds = f"split seed {first.split_seed} vs {m.split_seed}"
        if not allow_different:
            raise UserError(
                f"runs {first.name} and {m.name} were trained on the same data but split differently "
                f"({seeds}, or other fractions): their {split} splits differ; compare them on the images "
                "both splits share (held out from both) with allow_different=true, or on eval=<npz or folder>"
            )
        return "shared images"
    return "same split"
