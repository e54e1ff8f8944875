"""A run's data described as MLflow dataset inputs: one JSON record per split (train / val / test), so that
the MLflow UI's Dataset column and run page show what a model was trained, early-stopped and tested on.
The records travel through the run's outbox like every other record; `bloodcell.tracking.datasets` makes
MLflow's entities of them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from bloodcell import CLASS_NAMES
from bloodcell.core.settings import DataSchema

SPLITS = ("train", "val", "test")


#: digest length: MLflow's store keeps 36 characters; 16 hex digits (64 bits) name a split exactly
#: enough and stay readable in the UI (the profile carries the full fingerprint)
DIGEST_CHARS = 16


def dataset_name(data_cfg: DataSchema | Any) -> str:
    """What the UI calls the data (``data`` settings, or a mapping of them: `DataSchema.of`): the file or
    folder name, ``bloodmnist_<size>``, or ``demo``."""
    data = DataSchema.of(data_cfg)
    if data.format in ("npz", "folder") and data.path:
        return Path(data.path).stem or data.path
    if data.format == "medmnist":
        return f"bloodmnist_{data.size}"
    return str(data.format)


def dataset_source(data_cfg: Any) -> tuple[str, dict[str, Any]]:
    """(MLflow source type, source) of the data: a local file or folder, MedMNIST's download URL, or the
    code that generates demo images."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]  # made at import

    data = DataSchema.of(data_cfg)
    fmt = data.format
    source: Any
    if fmt in ("npz", "folder") or (fmt == "medmnist" and data.path):
        from bloodcell.data import resolve_path

        source = LocalArtifactDatasetSource(str(resolve_path(str(data.path)).resolve()))
    elif fmt == "medmnist":
        from bloodcell.data.formats import MEDMNIST_FILES, MEDMNIST_RECORD

        filename = MEDMNIST_FILES[data.size][0] if data.size in MEDMNIST_FILES else ""
        source = HTTPDatasetSource(f"{MEDMNIST_RECORD}/{filename}")
    else:
        generator = {"per_class": data.per_class, "image_size": data.image_size, "demo_seed": data.demo_seed}
        settings = {k: str(v) for k, v in generator.items()}
        source = CodeDatasetSource({"generator": "bloodcell.data.make_demo_set", **settings})
    return source._get_source_type(), json.loads(source.to_json())


def split_digest(fingerprint: str, part: str, positions: np.ndarray) -> str:
    """Names exactly one split's images: the fingerprint of the set it was cut from and which images of it
    the split holds (two runs with another seed or other fractions get another digest)."""
    digest = hashlib.sha256(f"{fingerprint}|{part}|".encode())
    digest.update(np.ascontiguousarray(positions, dtype=np.int64).data)
    return digest.hexdigest()[:DIGEST_CHARS]


def dataset_inputs(data_cfg: Any, arrays: Any, splits: Any) -> list[dict[str, Any]]:
    """One JSON record per split: name, digest, source, schema, profile, context (see the module)."""
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.types import Schema, TensorSpec

    source_type, source = dataset_source(data_cfg)
    records = []
    for part in SPLITS:
        split = getattr(splits, part)
        images, labels = split.images, np.asarray(split.labels)
        counts = np.bincount(labels.astype(np.int64), minlength=len(CLASS_NAMES))
        schema = TensorDatasetSchema(
            features=Schema([TensorSpec(images.dtype, (-1, *images.shape[1:]), "images")]),
            targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "labels")]),
        )
        profile: dict[str, Any] = {
            "images": len(labels),
            "classes": {name: int(n) for name, n in zip(CLASS_NAMES, counts)},
            "image_shape": list(images.shape[1:]),
            "data_fingerprint": arrays.fingerprint,
        }
        if split.fingerprint != arrays.fingerprint:  # cut from the cleaned set (data.clean=true)
            profile["cleaned_fingerprint"] = split.fingerprint
        records.append(
            {
                "name": dataset_name(data_cfg),
                "digest": split_digest(split.fingerprint, part, splits.positions(part)),
                "source_type": source_type,
                "source": json.dumps(source),
                "schema": json.dumps(schema.to_dict()),
                "profile": json.dumps(profile),
                "context": part,
            }
        )
    return records
