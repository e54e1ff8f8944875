"""Weight averaging in training: the optimizer's moving average (trainer.ema) and stochastic weight averaging
over phase 2's last epochs (finetune.swa). One in-process tiny fit for SWA's arithmetic, then four tiny
runs: an SWA run, and an EMA run killed in phase 2 and resumed beside its uninterrupted EMA twin; the SWA
run (no EMA, same seed and data order) is the EMA runs' plain twin."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.test_resume import RUN, _kill_in_phase2  # the kill-in-phase-2 pattern of the exact-resume test
from tests.helpers import Started, assert_ok, mlflow_runs, run_module, sqlite_store

EMA = ["trainer.ema=true", "trainer.ema_momentum=0.9"]  # ~10 steps: a few tiny epochs
SWA = ["finetune.swa=true", "finetune.swa_epochs=3"]


def test_weight_average_is_the_mean_of_the_last_epochs_weights_and_survives_a_checkpoint():
    import keras

    from bloodcell.training.callbacks import WeightAverage

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype(np.float32), rng.normal(size=(32, 2)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    seen: list[list[np.ndarray]] = []
    probe = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append([v.numpy() for v in model.trainable_weights])
    )
    averaging = WeightAverage(3)
    model.fit(x, y, batch_size=8, epochs=5, verbose=0, callbacks=[averaging, probe])

    assert len(averaging.window) == 3
    for i, average in enumerate(averaging.average()):
        np.testing.assert_allclose(average, np.mean([epoch[i] for epoch in seen[-3:]], axis=0), rtol=1e-6)
        assert not np.allclose(average, seen[-1][i])  # the weights moved: the mean is not the last epoch
    # what a checkpoint keeps of it gives the same average back (a resumed run averages the same epochs)
    again = WeightAverage(3)
    again.restore(averaging.flat(), len(model.trainable_weights))
    for a, b in zip(again.average(), averaging.average()):
        np.testing.assert_array_equal(a, b)


def _only_run(store: str):
    (run,) = mlflow_runs(store, "quickstart")
    assert run.info.status == "FINISHED" and "error" not in run.data.tags, run.data.tags.get("error")
    return run


def _history(store: str, run_id: str, metric: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    return [
        m.value for m in sorted(MlflowClient(store).get_metric_history(run_id, metric), key=lambda m: m.step)
    ]


def _test_probabilities(run) -> np.ndarray:
    import mlflow

    path = mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/predictions/test.npz")
    with np.load(path) as stored:
        return stored["probabilities"]


@pytest.fixture(scope="module")
def swa_store(tmp_path_factory) -> str:
    store = sqlite_store(tmp_path_factory.mktemp("swa") / "mlflow.db")
    assert_ok(run_module("bloodcell.train", *RUN, *SWA, f"tracking.uri={store}"))
    return store


def test_swa_run_averages_phase2s_last_epochs_and_keeps_the_average_only_if_validation_agrees(swa_store):
    run = _only_run(swa_store)
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    assert params["finetune.swa"] == "True" and params["finetune.swa_epochs"] == "3"
    assert params["trainer.ema"] == "False"
    assert metrics["swa_epochs_averaged"] == 3  # phase 2 ran 4 epochs: its last 3
    assert 0 <= metrics["swa_val_accuracy"] <= 1
    assert tags["final_weights"] in ("swa", "phase2", "phase1")
    if tags["final_weights"] == "swa":  # the final model is the average validation scored
        assert metrics["swa_val_accuracy"] >= metrics["best_val_accuracy"] - 1e-6
        assert metrics["final_val_accuracy"] == pytest.approx(metrics["swa_val_accuracy"], abs=1e-6)
    else:  # the average lost on validation: the best epoch's weights stayed
        assert metrics["swa_val_accuracy"] < metrics["best_val_accuracy"]
        assert metrics["final_val_accuracy"] == pytest.approx(metrics["best_val_accuracy"], abs=1e-6)


def test_ema_run_killed_in_phase2_resumes_with_its_average_and_differs_from_the_plain_twin(
    tmp_path, swa_store
):
    killed = sqlite_store(tmp_path / "killed" / "mlflow.db")
    twin = sqlite_store(tmp_path / "twin" / "mlflow.db")
    # the uninterrupted EMA twin trains beside the killed run and its resume
    with Started("bloodcell.train", *RUN, *EMA, f"tracking.uri={twin}") as twin_run:
        _kill_in_phase2([*RUN, *EMA, f"tracking.uri={killed}"], tmp_path / "killed" / "checkpoints")
        assert_ok(run_module("bloodcell.train", *RUN, *EMA, f"tracking.uri={killed}", "trainer.resume=auto"))
        assert_ok(twin_run.finish())
    resumed, ema, plain = _only_run(killed), _only_run(twin), _only_run(swa_store)

    # the params record it
    assert ema.data.params["trainer.ema"] == "True" and ema.data.params["trainer.ema_momentum"] == "0.9"
    # exact resume: the optimizer's moving averages came back from the checkpoint (had they restarted,
    # the averaged weights that validation scores after the resume would differ from the twin's)
    assert resumed.data.tags["resumed"] == "1"
    ids = resumed.info.run_id, ema.info.run_id
    resumed_val, ema_val = (_history(store, i, "val_loss") for store, i in zip((killed, twin), ids))
    assert len(resumed_val) == len(ema_val) == 6
    np.testing.assert_allclose(resumed_val, ema_val, rtol=1e-4, atol=1e-5)
    for name in ("test_accuracy", "best_val_accuracy", "final_val_accuracy"):
        assert resumed.data.metrics[name] == pytest.approx(ema.data.metrics[name], abs=1e-6), name
    np.testing.assert_allclose(_test_probabilities(resumed), _test_probabilities(ema), atol=1e-5)

    # EMA leaves training as it is (same seed, same data order: the first epoch's training loss is the
    # plain twin's), but validation scores the averaged weights, and the final model holds them
    ema_train = _history(twin, ema.info.run_id, "train_loss")
    plain_train = _history(swa_store, plain.info.run_id, "train_loss")
    assert ema_train[0] == pytest.approx(plain_train[0], rel=1e-6)
    assert ema_val[0] != pytest.approx(_history(swa_store, plain.info.run_id, "val_loss")[0], rel=1e-4)
    assert not np.allclose(_test_probabilities(ema), _test_probabilities(plain), atol=1e-4)
    # the final model is the best epoch's averaged weights: what validation scored
    assert ema.data.metrics["final_val_accuracy"] == pytest.approx(
        ema.data.metrics["best_val_accuracy"], abs=1e-6
    )
