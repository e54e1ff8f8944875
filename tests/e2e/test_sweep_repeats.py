"""Repeated and cross-validated sweep trials (issue 15 item 4), run as a user would: ``python -m
bloodcell.train -m +sweeps=quick hydra.sweeper.repeats=2`` and ``data.cv.folds=3``, on the tiny quickstart
run. Asserted on what Optuna's storage and MLflow hold: one trial run per trial with one child run per
repeat (fold), the trial's value the mean of its children's, and a killed cross-validated trial resumed
without training its finished fold again."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.test_sweep import (
    _start_sweep,
    kill_after_first_report,
    load_study,
    mlflow_runs,
    states,
    sweep_args,
)
from tests.helpers import assert_ok, assert_user_error, run_module


def trial_runs_and_members(tmp_path):
    """The sweep's parent run, its trial runs by trial number, and each trial run's member runs."""
    client, parents, runs = mlflow_runs(tmp_path)
    assert len(parents) == 1
    parent = parents[0].info.run_id
    trials = {
        int(r.data.tags["trial_number"]): r for r in runs if r.data.tags["mlflow.parentRunId"] == parent
    }
    members = {
        number: [r for r in runs if r.data.tags["mlflow.parentRunId"] == run.info.run_id]
        for number, run in trials.items()
    }
    return client, parents[0], trials, members


@pytest.mark.slow
def test_repeats_train_each_point_twice_as_child_runs_and_the_trial_value_is_their_mean(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = run_module(
        "bloodcell.train",
        *sweep_args(tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.repeats=2", "seed=7"),
        cwd=tmp_path,
        timeout=1200,
    )
    assert_ok(proc)
    study = load_study(storage)
    assert states(study) == {"COMPLETE": 2}
    client, parent, trials, members = trial_runs_and_members(tmp_path)
    assert parent.data.params["repeats"] == "2"
    # the sweep's table carries each trial's spread (its Optuna user attributes)
    table = pd.read_csv(tmp_path / "multirun" / "trials.csv")
    for column in ("mean", "std", "min", "max"):
        assert f"user_attrs_repeat_val_accuracy_{column}" in table.columns, column
    assert table["user_attrs_repeat_val_accuracy_mean"].tolist() == pytest.approx(table["value"].tolist())
    assert sorted(trials) == [0, 1]
    for trial in study.trials:
        run = trials[trial.number]
        assert run.info.status == "FINISHED"
        assert run.data.tags["bloodcell.group"] == "repeats"
        assert run.data.tags["optuna_trial_id"] and run.data.tags["optuna.trial_state"] == "COMPLETE"
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id  # the sweeper links the trial's run
        children = sorted(members[trial.number], key=lambda r: int(r.data.tags["bloodcell.member_index"]))
        assert [c.data.tags["bloodcell.member_index"] for c in children] == ["0", "1"]
        assert {c.info.status for c in children} == {"FINISHED"}
        assert [c.data.params["seed"] for c in children] == ["7", "8"]  # seed, seed + 1 ...
        assert len({c.data.tags["split_fingerprint"] for c in children}) == 1  # ... on one split
        # the sampled point is the trial's, in every repeat
        for key, value in trial.params.items():
            assert all(math.isclose(float(c.data.params[key]), float(value)) for c in children), key
        values = [c.data.metrics["best_val_accuracy"] for c in children]
        assert trial.value == pytest.approx(np.mean(values))
        # Optuna's steps are the repeats, each with its own value (no epoch reports)
        assert trial.intermediate_values == pytest.approx({0: values[0], 1: values[1]})
        attrs = trial.user_attrs
        assert attrs["repeat_val_accuracy_values"] == pytest.approx(values)
        assert attrs["repeat_val_accuracy_std"] == pytest.approx(np.std(values, ddof=1))
        assert attrs["repeat_val_accuracy_min"] == pytest.approx(min(values))
        metrics = run.data.metrics
        assert metrics["val_accuracy_mean"] == pytest.approx(trial.value)
        assert metrics["val_accuracy_max"] == pytest.approx(max(values))
        history = sorted(
            client.get_metric_history(run.info.run_id, "repeat/val_accuracy"), key=lambda m: m.step
        )
        assert [m.step for m in history] == [0, 1]
        assert [m.value for m in history] == pytest.approx(values)


@pytest.mark.slow
def test_cross_validated_trial_killed_after_a_fold_resumes_without_training_that_fold_again(tmp_path):
    """data.cv.folds=3 with the Wilcoxon pruner: three fold runs under the trial's run, disjoint
    validation folds, one held-out test split, the mean as the trial's value; a sweep SIGKILLed after
    fold 0 finished reuses fold 0's run and value when resumed."""
    storage = f"journal:{tmp_path / 'optuna.journal'}"
    args = ("hydra.sweeper.n_trials=1", "data.cv.folds=3", "hydra.sweeper.pruner.name=wilcoxon")
    sweep = _start_sweep(tmp_path, *args, storage=storage)
    kill_after_first_report(sweep, storage, timeout=600)  # once fold 0 was reported (its run has FINISHED)
    killed_at = time.time() * 1000
    assert list(load_study(storage).trials[0].intermediate_values) == [0]

    proc = run_module(
        "bloodcell.train", *sweep_args(tmp_path, *args, storage=storage), cwd=tmp_path, timeout=1200
    )
    assert_ok(proc)
    assert "fold 1/3: FINISHED before" in proc.stdout + proc.stderr
    study = load_study(storage)
    assert states(study) == {"COMPLETE": 1}
    trial = study.trials[0]
    assert trial.user_attrs["interruptions"] == 1

    client, _, trials, members = trial_runs_and_members(tmp_path)
    assert list(trials) == [0]  # the resumed trial went on in its own trial run
    run = trials[0]
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "1"
    assert run.data.tags["bloodcell.group"] == "cv"
    folds = members[0]
    finished = {int(r.data.tags["bloodcell.member_index"]): r for r in folds if r.info.status == "FINISHED"}
    assert sorted(finished) == [0, 1, 2]
    # fold 0 ran once, before the kill: the resumed trial reused it
    assert [r.data.tags["bloodcell.member_index"] for r in folds].count("0") == 1
    assert finished[0].info.end_time < killed_at
    values = [finished[k].data.metrics["best_val_accuracy"] for k in range(3)]
    assert trial.value == pytest.approx(np.mean(values))
    assert trial.intermediate_values == pytest.approx(dict(enumerate(values)))
    assert trial.user_attrs["fold_val_accuracy_mean"] == pytest.approx(trial.value)
    assert run.data.metrics["val_accuracy_mean"] == pytest.approx(trial.value)

    # the folds as trained: disjoint validation images that with training make up the same pool, and one
    # test split held out of all of them (each run's stored predictions name its images)
    splits = []
    for k in range(3):
        fold = {}
        for part in ("val", "test"):
            path = client.download_artifacts(
                finished[k].info.run_id, f"predictions/{part}.npz", str(tmp_path)
            )
            with np.load(path) as stored:
                fold[part] = set(stored["data_index"].tolist())
        splits.append(fold)
    assert splits[0]["test"] == splits[1]["test"] == splits[2]["test"]
    vals = [s["val"] for s in splits]
    assert not (vals[0] & vals[1] or vals[0] & vals[2] or vals[1] & vals[2])
    assert not (set().union(*vals) & splits[0]["test"])
    assert len(set().union(*vals)) + len(splits[0]["test"]) == 96  # TINY: 12 cells x 8 classes


def test_repeats_with_cross_validation_is_refused_before_any_trial(tmp_path):
    proc = run_module(
        "bloodcell.train",
        *sweep_args(tmp_path, "hydra.sweeper.repeats=2", "data.cv.folds=3"),
        cwd=tmp_path,
        timeout=300,
    )
    assert_user_error(proc, "hydra.sweeper.repeats=2 with data.cv.folds=3: choose one")
    assert not (tmp_path / "optuna.db").exists()  # no study
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # made (empty) by sweep_args: it stays so
    assert [experiment.name for experiment in store.search_experiments()] == ["Default"]
