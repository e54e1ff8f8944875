"""What a run records for the MLflow UI (issue 16): its data splits as dataset inputs, metric names grouped
into the UI's chart sections, per-epoch throughput, system metrics, the experiment's kind and the links
bloodcell prints. No training; the store test uses a SQLite file."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from bloodcell import CLASS_NAMES, tracking
from bloodcell.data import Arrays as DataArrays
from bloodcell.data import fingerprint, make_demo_set, split_arrays
from bloodcell.data.mlflow_inputs import dataset_inputs
from bloodcell.tracking import outbox
from bloodcell.tracking.datasets import to_dataset_inputs
from bloodcell.tracking.recorder import Recorder
from bloodcell.tracking.run import system_metrics

DEMO = OmegaConf.create({"format": "demo", "per_class": 6, "image_size": 16, "demo_seed": 0})


def demo_splits(seed: int = 0):
    images, labels = make_demo_set(per_class=6, image_size=16, seed=0)
    arrays = DataArrays(images, labels, fingerprint(images, labels), "demo")
    return arrays, split_arrays(arrays, 0.25, 0.25, seed)


def test_each_split_is_a_dataset_input_with_its_context_digest_and_class_counts():
    arrays, splits = demo_splits()
    records = dataset_inputs(DEMO, arrays, splits)
    assert [r["context"] for r in records] == ["train", "val", "test"]
    assert {r["name"] for r in records} == {"demo"} and len({r["digest"] for r in records}) == 3
    assert all(r["source_type"] == "code" for r in records)
    profiles = [json.loads(r["profile"]) for r in records]
    assert [p["images"] for p in profiles] == [len(splits.train), len(splits.val), len(splits.test)]
    assert sum(sum(p["classes"].values()) for p in profiles) == len(arrays)
    assert list(profiles[0]["classes"]) == list(CLASS_NAMES)
    assert all(p["data_fingerprint"] == arrays.fingerprint for p in profiles)
    assert "uint8" in records[0]["schema"] and "[-1, 16, 16, 3]" in records[0]["schema"]
    json.dumps(records)  # they travel through the outbox as JSON
    # another split of the same data is another dataset (MLflow shares one per name and digest)
    other = dataset_inputs(DEMO, arrays, demo_splits(seed=1)[1])
    assert other[0]["digest"] != records[0]["digest"]
    assert dataset_inputs(DEMO, arrays, splits) == records  # and the same split the same one

    (entity,) = to_dataset_inputs(records[:1])
    assert entity.dataset.digest == records[0]["digest"]
    assert [(t.key, t.value) for t in entity.tags] == [("mlflow.data.context", "train")]


def test_dataset_sources_name_the_file_or_the_download(tmp_path):
    from bloodcell.data.mlflow_inputs import dataset_name, dataset_source

    npz = OmegaConf.create({"format": "npz", "path": str(tmp_path / "training_set.npz")})
    assert dataset_name(npz) == "training_set"
    assert dataset_source(npz) == ("local", {"uri": str(tmp_path / "training_set.npz")})
    medmnist = OmegaConf.create({"format": "medmnist", "size": 64, "path": None})
    kind, source = dataset_source(medmnist)
    assert dataset_name(medmnist) == "bloodmnist_64" and kind == "http" and "zenodo" in source["url"]


def test_secondary_metrics_go_to_named_sections_and_learning_curves_keep_their_names(monkeypatch):
    sent: list[dict] = []
    recorder = Recorder(run=None)
    monkeypatch.setattr(recorder, "send", sent.append)
    recorder.log_timings({"seconds_fit": 2.0, "seconds_in_train": 3.0})
    assert sent[-1]["metrics"] == {"time/seconds_fit": 2.0, "time/seconds_in_train": 3.0}

    from bloodcell.evaluation.metrics import evaluate_predictions

    labels = np.arange(40) % 8
    metrics = evaluate_predictions(labels, np.eye(8)[labels]).metrics
    assert metrics["test_accuracy"] == 1.0  # the headline figures keep their names (promote, sweeps)
    per_class = [k for k in metrics if "recall_" in k or "precision_" in k]
    assert len(per_class) == 16 and all(k.startswith("per_class/test_") for k in per_class)


def test_epoch_record_carries_the_training_throughput():
    from bloodcell.training.callbacks import IMAGES_PER_SECOND, EpochLogger, epoch_record

    model = SimpleNamespace(optimizer=SimpleNamespace(learning_rate=0.01))
    record = epoch_record(3, {"loss": 0.5, "val_loss": 0.6}, model, images_per_second=250.0)
    assert record == pytest.approx(
        {"epoch": 3, "train_loss": 0.5, "val_loss": 0.6, "learning_rate": 0.01, IMAGES_PER_SECOND: 250.0}
    )
    assert IMAGES_PER_SECOND not in epoch_record(3, {}, model)
    assert IMAGES_PER_SECOND.startswith("time/")  # beside the run's timings, not among the curves

    logger = EpochLogger(images_per_epoch=1000)
    assert logger.images_per_second() is None  # nothing measured yet
    logger.on_epoch_begin(0)
    logger.on_train_batch_end(0)
    assert logger.images_per_second() > 1000  # 1000 images in well under a second


def test_system_metrics_follow_the_config_of_each_run_and_leave_no_setting_behind(monkeypatch):
    import os

    name = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"  # what MLflow's monitor reads as a run starts
    monkeypatch.delenv(name, raising=False)
    for off in (0, None):
        with system_metrics(OmegaConf.create({"system_metrics_seconds": off})) as on:
            assert not on and name not in os.environ
    with system_metrics(OmegaConf.create({"system_metrics_seconds": 3})) as on:
        assert on and float(os.environ[name]) == 3.0
    # gone after the run's start: the next run of this process (and a command it starts) takes its own
    assert name not in os.environ
    with system_metrics(OmegaConf.create({"system_metrics_seconds": 5})) as on:
        assert on and float(os.environ[name]) == 5.0
    monkeypatch.setenv(name, "7")  # the user's own setting wins, and stays
    with system_metrics(OmegaConf.create({"system_metrics_seconds": 3})) as on:
        assert on and os.environ[name] == "7"
    assert os.environ[name] == "7"


def test_links_open_the_model_training_pages_without_credentials():
    assert tracking.ui_url("3", "abc", "sqlite:////x/mlflow.db") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    )
    assert tracking.ui_url("3", tracking_uri="https://user:secret@mlflow.example:8443/prefix") == (
        "https://mlflow.example:8443/prefix/#/experiments/3?workflowType=machine_learning"
    )


def test_experiments_are_marked_model_training_and_records_reach_the_store(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    tracking_cfg = OmegaConf.create({"uri": uri, "experiment": "fresh"})
    experiment_id = tracking.setup_experiment(tracking_cfg)
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    older = client.create_experiment("older")  # made before bloodcell marked its experiments
    tracking.setup_experiment(OmegaConf.create({"uri": uri, "experiment": "older"}))
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"

    arrays, splits = demo_splits()
    run = client.create_run(experiment_id)
    outbox.apply(run.info.run_id, {"kind": "inputs", "inputs": dataset_inputs(DEMO, arrays, splits)})
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert sorted(i.tags[0].value for i in inputs) == ["test", "train", "val"]
    mlflow.set_tracking_uri(previous)  # setup_experiment pointed the process at the test store


class _RacedClient:
    """A real client whose first ``log_inputs`` fails as MLflow's SQLite store failed when another trial
    inserted the same dataset between its lookup and its insert (two sweep processes, one store)."""

    def __init__(self, client, error: str) -> None:
        self.client, self.error, self.calls = client, error, 0

    def log_inputs(self, run_id, datasets):
        from mlflow.exceptions import MlflowException

        self.calls += 1
        if self.calls == 1:
            raise MlflowException(self.error)
        return self.client.log_inputs(run_id, datasets=datasets)


def test_inputs_are_logged_when_another_run_created_the_dataset_meanwhile(tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("race"))
    arrays, splits = demo_splits()
    datasets = to_dataset_inputs(dataset_inputs(DEMO, arrays, splits))
    raced = _RacedClient(
        client, "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, ..."
    )
    outbox.log_inputs_once_created(raced, run.info.run_id, datasets)
    assert raced.calls == 2
    assert len(client.get_run(run.info.run_id).inputs.dataset_inputs) == 3
    # any other refusal is an error as before
    other = _RacedClient(client, "(sqlite3.OperationalError) no such table: datasets")
    with pytest.raises(MlflowException, match="no such table"):
        outbox.log_inputs_once_created(other, run.info.run_id, datasets)
    assert other.calls == 1
