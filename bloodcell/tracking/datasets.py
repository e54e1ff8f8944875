"""A run's data as MLflow dataset inputs: one per split (train / val / test), so that the MLflow UI's
Dataset column and run page show what a model was trained, early-stopped and tested on.

`dataset_inputs` turns the splits into plain JSON records (they travel through the run's outbox like every
other record, `bloodcell.tracking.outbox`); `to_dataset_inputs` makes MLflow's entities of them.
"""

from __future__ import annotations

from typing import Any

#: MLflow's tag naming an input's role (``mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT``)
CONTEXT_TAG = "mlflow.data.context"


def to_dataset_inputs(records: list[dict[str, Any]]) -> list[Any]:
    """MLflow's DatasetInput entities for `MlflowClient.log_inputs`."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    fields = ("name", "digest", "source_type", "source", "schema", "profile")
    return [
        DatasetInput(Dataset(**{k: r[k] for k in fields}), [InputTag(CONTEXT_TAG, r["context"])])
        for r in records
    ]
