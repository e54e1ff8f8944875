"""Per-epoch checkpoints of a training run (``trainer.checkpoint``), and finding the one to resume.

A checkpoint is a folder ``<checkpoints root>/<run id>/epoch-<NNNN>/`` holding ``state.json`` (epoch,
phase, early-stopping and time-limit state, the epoch history) and ``arrays.npz`` (every variable of the
model, the optimizer and the augmentation, including the random generators' states; the early-stopping
best weights; phase 1's best weights during phase 2). It is written under a temporary name and renamed
when complete, so a kill at any moment leaves either the previous checkpoint or the new one, never a
half-written folder under a final name. The root is ``trainer.checkpoint.dir`` if set, else
``checkpoints/`` beside a local SQLite store (default ``mlruns/checkpoints``), else
``<project root>/mlruns/checkpoints``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bloodcell import PROJECT_ROOT

STATE_FILE, ARRAYS_FILE = "state.json", "arrays.npz"


def root_for(tracking_uri: str, configured: str | None = None) -> Path:
    """Where the checkpoints of runs in this MLflow store live (on local disk, whatever the store):
    ``trainer.checkpoint.dir`` when set, else beside a SQLite store, else <project root>/mlruns."""
    if configured:
        return Path(configured).expanduser().resolve()
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "checkpoints"
    return PROJECT_ROOT / "mlruns" / "checkpoints"


@dataclass
class Checkpoint:
    """One epoch's saved state. ``arrays`` maps a group name (``variables``, ``optimizer``, ``augment``,
    ``best_weights``, ``phase1_weights``) to its list of arrays, in the order the objects list them."""

    state: dict[str, Any]
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    path: Path | None = None

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])


def save(run_dir: Path, checkpoint: Checkpoint, keep: int = 1) -> Path:
    """Write atomically (temporary folder, fsync, rename), then drop all but the newest ``keep``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"epoch-{checkpoint.epoch:04d}"
    tmp = run_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        flat = {
            f"{group}/{i:05d}": np.asarray(a)
            for group, arrays in checkpoint.arrays.items()
            for i, a in enumerate(arrays)
        }
        with open(tmp / ARRAYS_FILE, "wb") as out:
            np.savez(out, **flat)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
            out.flush()
            os.fsync(out.fileno())
        with open(tmp / STATE_FILE, "w") as out:
            json.dump(checkpoint.state, out)
            out.flush()
            os.fsync(out.fileno())
        shutil.rmtree(final, ignore_errors=True)  # the same epoch again (a resumed run redoing it)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(run_dir.glob("epoch-*"))[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of a run, or None."""
    for path in sorted(run_dir.glob("epoch-*"), reverse=True):
        if (path / STATE_FILE).is_file() and (path / ARRAYS_FILE).is_file():
            state = json.loads((path / STATE_FILE).read_text())
            groups: dict[str, list[np.ndarray]] = {}
            with np.load(path / ARRAYS_FILE, allow_pickle=False) as data:
                for key in sorted(data.files):
                    groups.setdefault(key.split("/", 1)[0], []).append(data[key])
            return Checkpoint(state, groups, path)
    return None


def delete(run_dir: Path) -> None:
    """A run's folder: checkpoints, and the local model copy and outbox beside them."""
    shutil.rmtree(run_dir, ignore_errors=True)


def delete_epochs(run_dir: Path) -> None:
    """Only the checkpoints of a run (its outbox still waits for the tracking server)."""
    for path in run_dir.glob("epoch-*"):
        shutil.rmtree(path, ignore_errors=True)
