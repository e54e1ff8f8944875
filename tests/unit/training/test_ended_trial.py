"""A sweep trial whose run ended before its sweep process recorded it (the sweep was killed in between) is
not trained again when it comes back from the queue (issue 26, found by the chaos soak: the trial got a
second MLflow run). Real MLflow store (SQLite), no training."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient

from bloodcell.core.cli import compose
from bloodcell.core.settings import TrainSchema
from bloodcell.tracking.outbox import Outbox
from bloodcell.training.resume import ended_trial_outcome
from tests.helpers import TINY, mlflow_at, sqlite_store


def _settings(uri: str, trial_id: int, *extra: str) -> TrainSchema:
    from bloodcell.core.settings import validated

    cfg = compose([*TINY, f"tracking.uri={uri}", "+trial.storage=sqlite:///x.db", "+trial.study_name=s",
                   f"+trial.trial_id={trial_id}", f"+trial.number={trial_id}", *extra])  # fmt: skip
    return validated(cfg, TrainSchema)


def _trial_run(client: MlflowClient, trial_id: int, status: str, **tags: str) -> str:
    experiment = client.get_experiment_by_name("quickstart")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("quickstart")
    all_tags = {"optuna_trial_id": str(trial_id), "optuna_study": "s", **tags}
    run_id = client.create_run(experiment_id, tags=all_tags).info.run_id
    client.log_metric(run_id, "best_val_accuracy", 0.75)
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


def test_a_trial_whose_run_ended_gives_its_outcome_again_instead_of_training(tmp_path):
    uri = sqlite_store(tmp_path / "mlflow.db")
    with mlflow_at(uri):
        client = MlflowClient(uri)
        assert ended_trial_outcome(_settings(uri, 1)) is None  # nothing ran yet: train
        _trial_run(client, 1, "FAILED")  # killed: resumed as before, not an outcome
        assert ended_trial_outcome(_settings(uri, 1)) is None
        _trial_run(client, 1, "FINISHED")
        assert ended_trial_outcome(_settings(uri, 1)) == 0.75
        _trial_run(
            client, 2, "KILLED", **{"optuna.trial_state": "PRUNED", "pruned_reason": "pruned after epoch 3"}
        )
        with pytest.raises(optuna.TrialPruned, match="epoch 3"):
            ended_trial_outcome(_settings(uri, 2))
        # killed while the server was away: its end still waits in its outbox, and is sent first
        waiting = _trial_run(client, 4, "RUNNING")
        box = Outbox(waiting, tmp_path / "checkpoints" / waiting / "outbox")
        box.add({"kind": "end", "status": "FINISHED"})
        checkpoints = f"trainer.checkpoint.dir={tmp_path / 'checkpoints'}"
        assert ended_trial_outcome(_settings(uri, 4, checkpoints)) == 0.75
        # a member's run (repeats, folds) is not the trial's own
        _trial_run(client, 3, "FINISHED", **{"bloodcell.member": "repeat"})
        assert ended_trial_outcome(_settings(uri, 3)) is None
