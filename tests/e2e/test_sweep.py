"""Optuna sweeps as Hydra multiruns (issue 4): the sweeper plugin, pruning, resuming, parallel sweeps.

End-to-end tests run `python -m bloodcell.train -m ...` as a user would, on the tiny quickstart run (32x32
synthetic images, one epoch per phase), each with its own Optuna storage and MLflow store in tmp_path.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    TINY,
    assert_ok,
    assert_user_error,
    needs_lite0,
    needs_shared_weights,
    run_module,
    sqlite_store,
)

# Speeds a trial up: no model logging (the train tests cover it).
TRIAL = [o for o in TINY if o != "+experiment=quickstart"] + ["tracking.log_model=false"]
# (no +experiment: sweeps/quick.yaml pulls in the quickstart experiment itself)


def sweep_args(tmp: Path, *extra: str, storage: str | None = None) -> list[str]:
    storage = storage or f"sqlite:///{tmp / 'optuna.db'}"
    return [
        "-m",
        "+sweeps=quick",
        *TRIAL,
        f"tracking.uri={sqlite_store(tmp / 'mlflow.db')}",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweep.dir={tmp / 'multirun'}",
        *extra,
    ]


def load_study(storage: str, name: str = "quick"):
    import optuna

    from bloodcell.sweep.trial import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage))


def mlflow_runs(tmp: Path, experiment: str = "quickstart"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("bloodcell.sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def states(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------- fast checks
def test_search_space_syntax_maps_to_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.bloodcell_optuna_sweeper._search_space import parse_search_space

    space = parse_search_space(
        [
            "finetune.lr=tag(log, interval(1e-5, 1e-3))",
            "augmentation.strength=interval(0, 1)",
            "finetune.unfreeze_blocks=int(interval(0, 4))",
            "trainer.batch_size=range(16, 65, 16)",
            "+head.extra=choice(a, b)",
            "backbone=small_cnn,mobilenet",
            "+experiment=quickstart",
            "trainer.epochs=2",
            "trainer.epochs=interval(1, 3)",
            "augmentation.strength=0.3",
        ]
    )
    d = space.distributions
    assert d["finetune.lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert d["finetune.unfreeze_blocks"] == IntDistribution(0, 4)
    assert d["trainer.batch_size"] == IntDistribution(16, 64, step=16)  # range's stop is excluded
    assert d["head.extra"] == CategoricalDistribution(["a", "b"])
    assert d["backbone"] == CategoricalDistribution(["small_cnn", "mobilenet"])
    assert d["trainer.epochs"] == FloatDistribution(1, 3)  # the later override of a key wins
    assert "augmentation.strength" not in d
    assert space.fixed == ["+experiment=quickstart", "augmentation.strength=0.3"]
    assert space.overrides_for({"head.extra": "a"})[-1] == "+head.extra=a"


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("finetune.lr=tag(log, interval(0, 1e-3))", "log scale"),
        ("finetune.lr=interval(1e-3, 1e-5)", "above high"),
        ("finetune.unfreeze_blocks=range(4, 1)", "empty"),
        ("finetune.lrr=interval(1e-5, 1e-3)", "do not compose"),
    ],
)
def test_invalid_search_space_fails_before_any_trial_with_one_line(tmp_path, bad, fragment):
    proc = run_module("bloodcell.train", *sweep_args(tmp_path, bad), cwd=tmp_path, timeout=120)
    assert_user_error(proc, fragment)
    assert (
        not (tmp_path / "optuna.db").exists() or not load_study(f"sqlite:///{tmp_path / 'optuna.db'}").trials
    )


def test_pruning_callback_reports_on_one_step_axis_and_raises_when_median_prunes(tmp_path):
    import optuna
    from omegaconf import OmegaConf

    from bloodcell.sweep.trial import PRUNER_ATTR, open_storage
    from bloodcell.training.callbacks import pruning_callback

    url = f"journal:{tmp_path / 'optuna.journal'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for _ in range(2):  # two good trials: 0.8, 0.9 at steps 0..3
        good = study.ask()
        for step in range(4):
            good.report(0.8 + step * 0.03, step)
        study.tell(good, 0.9)
    trial = study.ask()
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name("s"), trial.number
    )
    storage.set_trial_system_attr(
        trial_id, PRUNER_ATTR, {"name": "median", "kwargs": {"n_startup_trials": 1}}
    )
    cfg = OmegaConf.create(
        {
            "objective": "val_accuracy",
            "trial": {"storage": url, "study_name": "s", "trial_id": trial_id, "number": trial.number},
        }
    )
    assert pruning_callback(OmegaConf.create({"objective": "val_accuracy"})) is None
    callback = pruning_callback(cfg)
    callback.on_epoch_end(0, {"val_accuracy": 0.81})  # not below the median at step 0 (0.8): goes on
    # a second callback (phase 2) whose Keras epochs restart at 0 still reports after step 0; its best
    # (0.81) is below the median at step 1 (0.83)
    again = pruning_callback(cfg)
    with pytest.raises(optuna.TrialPruned):
        again.on_epoch_end(0, {"val_accuracy": 0.1})
    assert storage.get_trial(trial_id).intermediate_values == {0: 0.81, 1: 0.1}


# ---------------------------------------------------------------------------------------- sweeps
@pytest.mark.slow
def test_tiny_sweep_with_two_parallel_jobs_fills_optuna_and_mlflow(tmp_path):
    proc = run_module(
        "bloodcell.train",
        *sweep_args(
            tmp_path,
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            # sweeps/quick.yaml searches phase 2 only, so both trials share phase 1 (issue 19, 27): on a cold
            # cache one trains it, one reuses it
        ),
        cwd=tmp_path,
        timeout=600,
    )
    assert_ok(proc)
    study = load_study(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert states(study) == {"COMPLETE": 2}
    # one report per epoch of both phases, also from the trial whose phase-1 epoch was copied
    assert [len(t.intermediate_values) for t in study.trials] == [2, 2]
    assert study.trials[0].intermediate_values[0] == study.trials[1].intermediate_values[0]
    log = proc.stdout + proc.stderr
    assert "trial 0 COMPLETE" in log and "trial 1 COMPLETE" in log and "2/2 trials done" in log
    assert "phase 1 reused by 1 trial (1 epochs" in log

    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["study_name"] == "quick"
    assert parent.data.params["space.finetune.lr"] == "tag(log, interval(1e-5, 1e-2))"
    # the environment the sweep ran in, as each trial records it
    for tag in ("bloodcell_version", "git_commit", "tensorflow_version", "optuna_version"):
        assert parent.data.tags[tag] == children[0].data.tags[tag], tag
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["trial_number"] for c in children) == ["0", "1"]
    assert {c.data.tags["optuna.trial_state"] for c in children} == {"COMPLETE"}
    assert math.isclose(parent.data.metrics["best_value"], study.best_value)
    # phase 1 was trained once and stored once; the other trial started phase 2 from it
    trained, reused = sorted(children, key=lambda c: c.data.tags["phase1_reused"])
    assert (trained.data.tags["phase1_reused"], reused.data.tags["phase1_reused"]) == ("false", "true")
    assert reused.data.tags["phase1_source_run"] == trained.info.run_id
    entries = [p for p in (tmp_path / "checkpoints" / "phase1").iterdir() if p.is_dir()]
    assert [p.name for p in entries] == [trained.data.tags["phase1_key"]]
    assert [c.name for c in entries[0].iterdir()] == ["epoch-0000"]  # complete, no temporary folder left
    assert parent.data.metrics["n_phase1_reused"] == 1 and parent.data.metrics["phase1_saved_epochs"] == 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best.yaml", "trials.csv", "noise.txt", "plots"} <= artifacts
    # issue 15: every trial's intervals, and which trials the validation images cannot tell from the best
    import csv

    with (tmp_path / "multirun" / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"final_val_accuracy_ci_low", "test_accuracy_ci_high", "p_vs_best_holm"} <= set(rows[0])
    tied = {r["number"]: r["tied_with_best"] for r in rows}
    assert tied[str(study.best_trial.number)] == "best" and sorted(tied.values())[1] in ("no", "yes")
    assert parent.data.tags["tied_with_best"].split() == [str(study.best_trial.number), *(
        number for number, mark in tied.items() if mark == "yes")]  # fmt: skip
    assert parent.data.metrics["n_tied_with_best"] == len(parent.data.tags["tied_with_best"].split())
    assert "best_trial_test_accuracy_ci_low" in parent.data.metrics
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {
        "plots/optimization_history.png",
        "plots/param_importances.png",
        "plots/parallel_coordinate.png",
    } <= plots

    from omegaconf import OmegaConf

    best = OmegaConf.load(tmp_path / "multirun" / "best.yaml")
    assert best.trial_number == study.best_trial.number
    assert best.overrides[0] == "+experiment=quickstart"
    assert f"finetune.lr={study.best_params['finetune.lr']}" in best.overrides
    assert not any(o.startswith(("+sweeps", "++trial", "++tracking.parent")) for o in best.overrides)


@pytest.mark.slow
@needs_shared_weights
@needs_lite0
def test_the_backbone_study_trains_each_backbone_with_its_own_weights(tmp_path):
    """Issue 27: sweeps/backbone.yaml chooses the backbone as a config group, so each trial gets that
    backbone's weights and settings (mobilenet_025: the shared file; Lite0: the packaged ImageNet weights),
    not mobilenet_cpu's file for every choice. A grid over the two, tiny."""
    space = (
        "{backbone:'choice(mobilenet_025,efficientnet_lite0)',"
        "backbone.input_size:'choice(32)',finetune.lr:'choice(1e-3)'}"
    )
    proc = run_module(
        "bloodcell.train",
        "-m",
        "+sweeps=backbone",
        f"hydra.sweeper.params={space}",
        "hydra.sweeper.sampler.name=grid",
        "data=demo",
        *[o for o in TRIAL if o.startswith(("data.", "trainer.", "finetune.", "tracking."))],
        f"tracking.uri={sqlite_store(tmp_path / 'mlflow.db')}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        cwd=REPO,  # mobilenet_025's weights path is relative to the project, as a user runs it
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")},  # Lite0's conversion, not the user's cache
        timeout=600,
    )
    assert_ok(proc)
    study = load_study(f"sqlite:///{tmp_path / 'optuna.db'}", "backbone")
    assert states(study) == {"COMPLETE": 2}
    assert sorted(t.params["backbone"] for t in study.trials) == ["efficientnet_lite0", "mobilenet_025"]
    _, _, children = mlflow_runs(tmp_path, "mobilenet_cpu")
    built = {c.data.params["backbone.name"]: c.data.params for c in children}
    assert built["mobilenet"]["backbone.weights"].endswith("mobilenet_2_5_224_tf_no_top.h5")
    assert built["efficientnet_lite0"]["backbone.weights"] == "imagenet"
    assert "alpha" not in str(built["efficientnet_lite0"].get("backbone.kwargs", ""))
    # the packaged weights were converted for this run (a new cache), not skipped
    assert list((tmp_path / "cache" / "bloodcell" / "weights").glob("efficientnet_lite0-*.npz"))


def test_a_setting_that_cannot_learn_is_pruned_at_once(tmp_path):
    # lr 1e-9 cannot learn (0 is refused by the config check): chance accuracy (1/8) stays under the threshold
    # pruner's floor after epoch 1
    proc = run_module(
        "bloodcell.train",
        *sweep_args(
            tmp_path,
            "hydra.sweeper.n_trials=2",
            "trainer.epochs=3",
            "trainer.lr=1e-9",
            "finetune.lr=1e-9",
            "hydra.sweeper.pruner.name=threshold",
            "hydra.sweeper.pruner.threshold.lower=0.6",
        ),
        cwd=tmp_path,
        timeout=600,
    )
    assert_ok(proc)
    study = load_study(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert states(study) == {"PRUNED": 2}
    assert all(list(t.intermediate_values) == [0] for t in study.trials)  # stopped after the first epoch
    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 2
    for child in children:
        assert child.info.status == "KILLED"
        assert child.data.tags["optuna.trial_state"] == "PRUNED"
        assert "val_accuracy" in child.data.metrics  # the partial metrics stay
    assert "2 pruned" in proc.stdout + proc.stderr


def _start_sweep(tmp: Path, *extra: str, storage: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(
        [sys.executable, "-m", "bloodcell.train", *sweep_args(tmp, *extra, storage=storage)],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_after_first_report(sweep: subprocess.Popen, storage: str, timeout: float) -> None:
    """SIGKILL a sweep process once its running trial has reported its first step to Optuna (an epoch; a
    fold or repeat in a cross-validated or repeated trial)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and sweep.poll() is None:
            time.sleep(0.5)
            try:
                running = [t for t in load_study(storage).trials if t.state.name == "RUNNING"]
            except KeyError:  # no study yet
                continue
            if running and running[0].intermediate_values:
                break
        assert sweep.poll() is None, "the sweep ended before it could be killed"
        sweep.send_signal(signal.SIGKILL)
    finally:
        sweep.kill()
        sweep.communicate()


@pytest.mark.slow
def test_resume_after_sigkill_continues_the_interrupted_trial_from_its_checkpoint(tmp_path):
    """Issue 14: the killed trial goes back into the queue and resumes in its own MLflow run, from its
    checkpoint (fewer epochs than a restart), counted once; its pruning reports stay."""
    storage = f"journal:{tmp_path / 'optuna.journal'}"
    args = ("hydra.sweeper.n_trials=2", "trainer.epochs=2", "hydra.sweeper.pruner.name=none")
    sweep = _start_sweep(tmp_path, *args, storage=storage)
    kill_after_first_report(sweep, storage, timeout=300)  # in the middle of trial 0
    assert states(load_study(storage)) == {"RUNNING": 1}

    proc = run_module(
        "bloodcell.train", *sweep_args(tmp_path, *args, storage=storage), cwd=tmp_path, timeout=600
    )
    assert_ok(proc)
    study = load_study(storage)
    assert states(study) == {"COMPLETE": 2}
    interrupted = study.trials[0]
    assert interrupted.user_attrs["interruptions"] == 1 and "interrupted" not in interrupted.user_attrs
    assert sorted(interrupted.intermediate_values) == list(range(len(interrupted.intermediate_values)))
    assert "trial 0 interrupted" in proc.stdout + proc.stderr

    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1  # the resumed sweep logs to the same parent run
    numbers = sorted(c.data.tags["trial_number"] for c in children)
    assert numbers == ["0", "1"]  # one child run per Optuna trial, none twice
    by_number = {c.data.tags["trial_number"]: c for c in children}
    assert {c.info.status for c in children} == {"FINISHED"}
    resumed = by_number["0"]
    assert resumed.data.tags["resumed"] == "1" and resumed.data.tags["optuna.trial_state"] == "COMPLETE"
    assert int(resumed.data.tags["resumed_after_epoch"]) >= 0  # it did not train from epoch 0 again
    client, _, _ = mlflow_runs(tmp_path)
    steps = sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "val_accuracy"))
    assert steps == list(range(len(steps)))  # each epoch recorded once


@pytest.mark.slow
def test_two_sweep_processes_share_one_study_without_extra_or_lost_trials(tmp_path):
    storage = f"journal:{tmp_path / 'optuna.journal'}"
    args = ("hydra.sweeper.n_trials=3",)
    first = _start_sweep(tmp_path, *args, f"hydra.sweep.dir={tmp_path / 'a'}", storage=storage)
    second = _start_sweep(tmp_path, *args, f"hydra.sweep.dir={tmp_path / 'b'}", storage=storage)
    outputs = [p.communicate(timeout=900)[0] for p in (first, second)]
    for process, output in zip((first, second), outputs):
        assert process.returncode == 0, output[-4000:]
    study = load_study(storage)
    assert states(study) == {"COMPLETE": 3}
    assert sorted(t.number for t in study.trials) == [0, 1, 2]
    # the second process seeds its sampler differently: no point is tried twice
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3
    # both processes ran trials
    assert all("COMPLETE val_accuracy=" in output for output in outputs), outputs
    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1
    assert sorted(c.data.tags["trial_number"] for c in children) == ["0", "1", "2"]


@pytest.mark.slow
def test_a_trial_that_raises_is_fail_in_optuna_and_mlflow_and_the_sweep_goes_on(tmp_path):
    # trainer.epochs=0 is refused by train (a UserError) before any training: two quick failing trials
    proc = run_module(
        "bloodcell.train",
        *sweep_args(tmp_path, "hydra.sweeper.n_trials=2", "trainer.epochs=choice(0)"),
        cwd=tmp_path,
        timeout=300,
    )
    assert_ok(proc)
    study = load_study(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert states(study) == {"FAIL": 2}
    assert all("trainer.epochs=0 must be >= 1" in t.user_attrs["error"] for t in study.trials)
    assert "2 failed" in proc.stdout + proc.stderr
    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and sorted(c.data.tags["trial_number"] for c in children) == ["0", "1"]
    assert all(c.info.status == "FAILED" and "epochs" in c.data.tags["error"] for c in children)


@pytest.mark.slow
def test_a_sweep_whose_trials_all_fail_stops_after_max_consecutive_failures(tmp_path):
    proc = run_module(
        "bloodcell.train",
        *sweep_args(
            tmp_path,
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.max_consecutive_failures=1",
            "trainer.epochs=choice(0)",
        ),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: the last 1 trials failed, so the sweep stopped" in proc.stderr
    study = load_study(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert states(study) == {"FAIL": 1}
    _, parents, _ = mlflow_runs(tmp_path)
    assert [p.info.status for p in parents] == ["FAILED"]
