"""bloodcell.api.train and bloodcell.api.sweep in one Python process, as a notebook calls them: bad input is
one UserError with the command's line, and the process is clean for the next call (also after an error).
Real trainings on the tiny demo run (TINY_HEAD_ONLY), a real SQLite store, a real sweep of one trial."""

from __future__ import annotations

import pytest

from bloodcell import api
from tests.helpers import TINY_HEAD_ONLY


def assert_clean() -> None:
    """What a call must not leave behind: Hydra's global state (its config search, a job's config), an
    active MLflow run."""
    import mlflow
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    assert not GlobalHydra.instance().is_initialized() and not HydraConfig.initialized()
    assert mlflow.active_run() is None


def test_train_raises_the_commands_line_then_trains_twice(tracking):
    store = f"tracking.uri={tracking}"
    with pytest.raises(api.UserError, match=r"^trainer.epochs=0 must be >= 1; phase 1's epochs"):
        api.train(*TINY_HEAD_ONLY, store, "trainer.epochs=0")
    assert_clean()
    with pytest.raises(api.UserError, match=r"^Could not override 'trainer.epochz'\. To append"):
        api.train(*TINY_HEAD_ONLY, store, "trainer.epochz=1")
    assert_clean()

    first = api.train(*TINY_HEAD_ONLY, store)
    assert_clean()
    second = api.train(*TINY_HEAD_ONLY, store, "tracking.log_model=false", "seed=1")
    assert_clean()

    assert first.run_id != second.run_id and first.status == second.status == "FINISHED"
    assert first.model_uri and first.model_uri.startswith("models:/") and second.model_uri is None
    assert 0 <= first.metrics["test_accuracy"] <= 1 and "test_accuracy_ci_low" in first.metrics
    assert first.config is not None and first.config.seed == 42 and second.config.seed == 1
    assert first.tracking_uri == tracking and first.experiment_id == second.experiment_id
    html = first._repr_html_()
    assert first.run_id in html and first.link in html and "test_accuracy" in html
    assert "data:image/png;base64," in html  # the run's confusion matrix, inline
    import mlflow

    recorded = mlflow.artifacts.load_text(f"runs:/{second.run_id}/overrides.yaml")
    assert "- tracking.log_model=false" in recorded and "- seed=1" in recorded  # as a command records them


def test_sweep_raises_the_commands_line_then_runs_and_reads_the_study_back(tmp_path, tracking):
    trial = [o for o in TINY_HEAD_ONLY if o != "+experiment=quickstart"]  # the study brings the preset
    where = [
        f"tracking.uri={tracking}",
        f"hydra.sweeper.storage=journal:{tmp_path / 'optuna.journal'}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        "hydra.sweeper.n_trials=1",
        "tracking.log_model=false",
    ]
    with pytest.raises(api.UserError, match=r"^trainer.epochs=0 must be >= 1"):
        api.sweep("quick", *trial, *where, "trainer.epochs=0")  # checked here, before a process starts
    with pytest.raises(api.UserError, match=r"Could not find 'sweeps/quikc'"):
        api.sweep("quikc", *trial, *where)
    assert_clean()

    result = api.sweep("quick", *trial, *where)
    assert_clean()
    assert result.study_name == "quick" and result.parent_run_id and result.experiment_id
    assert len(result.trials) == 1 and result.trials["state"].tolist() == ["COMPLETE"]
    assert result.best_value == result.trials["value"][0]
    sampled = {c[len("params_") :] for c in result.trials.columns if c.startswith("params_")}
    assert "finetune.lr" in result.best_params and set(result.best_params) == sampled  # the study's space
    html = result._repr_html_()
    assert result.parent_run_id in html and "data:image/png;base64," in html  # the history, inline

    again = api.sweep("quick", *trial, *where)  # the study has its trial: resumed, nothing to run
    assert_clean()
    assert again.parent_run_id == result.parent_run_id and again.best_value == result.best_value
