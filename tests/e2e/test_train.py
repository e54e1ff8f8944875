"""`python -m bloodcell.train` end to end, as a user runs it, and what MLflow then holds."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from bloodcell import CLASS_NAMES
from tests.helpers import (
    REPO,
    SHARED_WEIGHTS,
    TINY,
    TINY_TRACED,
    assert_ok,
    mlflow_runs,
    needs_shared_weights,
    run_module,
)

# what a user's shell has: none of the tests' own quieting
USER_ENV = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """One tiny quickstart run shared by the assertions below (training is the slow part), as a new user
    starts it: the traced steps and explanations users get, verbose at its default, in the environment a
    new user has (no TF_CPP_MIN_LOG_LEVEL, no CUDA_VISIBLE_DEVICES set), output to files (SLURM, CI,
    `> log`), on a new store. Returns the store, the run and the process with its stdout and stderr."""
    tmp = tmp_path_factory.mktemp("qs")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"  # a truly new store, as on a user's first day: the run migrates it
    args = [o for o in TINY_TRACED if not o.startswith("trainer.verbose")]  # the default: verbose=auto
    out, err = tmp / "log.out", tmp / "log.err"
    with out.open("w") as stdout, err.open("w") as stderr:  # files, not a terminal
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bloodcell.train",
                *args,
                f"tracking.uri={uri}",
                f"hydra.run.dir={tmp / 'run'}",
            ],
            cwd=REPO,
            env=USER_ENV,
            stdout=stdout,
            stderr=stderr,
            timeout=600,
        )
    proc.stdout, proc.stderr = out.read_text(), err.read_text()
    assert_ok(proc)
    runs = mlflow_runs(uri, "quickstart")
    assert len(runs) == 1
    return uri, runs[0], proc


def test_quickstart_run_is_finished_with_params_and_test_metrics(quickstart_run):
    _, run, _ = quickstart_run
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["backbone.name"] == "small_cnn"
    assert params["trainer.epochs"] == "1" and params["finetune.epochs"] == "1"
    assert params["data.format"] == "demo" and params["seed"] == "42"
    metrics = run.data.metrics
    for name in [
        "test_accuracy",
        "test_macro_f1",
        "best_val_accuracy",
        *(f"per_class/test_precision_{c}" for c in CLASS_NAMES),
        *(f"per_class/test_recall_{c}" for c in CLASS_NAMES),
    ]:
        assert 0.0 <= metrics[name] <= 1.0, name
    tags = run.data.tags
    assert len(tags["data_fingerprint"]) == 64
    assert tags["git_dirty"] in ("True", "False", "unknown") and tags["git_commit"]
    assert tags["bloodcell_version"]


def test_epoch_metrics_of_both_phases_share_one_step_axis(quickstart_run):
    import mlflow

    uri, run, _ = quickstart_run
    client = mlflow.MlflowClient(uri)
    for metric in ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate"]:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == [0, 1], (metric, steps)  # epoch 0 = phase 1, epoch 1 = phase 2
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "learning_rate")}
    assert lrs[1] < lrs[0]  # phase 2 runs at the fine-tuning learning rate


def test_artifacts_and_logged_model_reloads_and_predicts(quickstart_run):
    import mlflow

    uri, run, _ = quickstart_run
    client = mlflow.MlflowClient(uri)
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.yaml", "classification_report.json", "plots"} <= paths
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {
        "plots/confusion_matrix.png",
        "plots/training_curves.png",
        "plots/reliability.png",
        "plots/accuracy_coverage.png",
    } <= plots
    # what the model looked at (tracking.explain, on by default): Grad-CAM per class, the test errors
    assert {"plots/gradcam.png", "plots/test_errors.png"} <= plots
    overrides = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/overrides.yaml")
    assert "+experiment=quickstart" in overrides
    import bloodcell.evaluation.calibration  # noqa: F401  (registers the temperature layer the calibrated model ends with)

    model = mlflow.keras.load_model(run.data.tags["model_uri"])
    probabilities = model.predict(np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)), verbose=0)
    assert probabilities.shape == (5, 8)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)


def test_calibrated_model_probabilities_and_abstention_metrics_agree(quickstart_run):
    """trainer.calibrate (default): a temperature fitted on validation, ECE before/after on both splits;
    the logged model ends with that temperature and its outputs are the run's stored test probabilities;
    the abstention metrics are those of the stored probabilities."""
    import mlflow

    from bloodcell.evaluation.abstention import abstention_metrics, guarantee_metrics
    from bloodcell.evaluation.calibration import expected_calibration_error

    uri, run, _ = quickstart_run
    metrics = run.data.metrics
    temperature = metrics["calibration/temperature"]
    assert 0.05 <= temperature <= 20
    for split in ("val", "test"):
        for when in ("before", "after"):
            assert 0.0 <= metrics[f"calibration/{split}_ece_{when}"] <= 1.0
    # temperature scaling minimises the validation NLL, not ECE; on 15 images the ECE may still rise a bit
    assert metrics["calibration/val_ece_after"] <= metrics["calibration/val_ece_before"] + 0.1
    stored = np.load(mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/predictions/test.npz"))
    probabilities, labels = stored["probabilities"], stored["labels"]
    assert metrics["calibration/test_ece_after"] == pytest.approx(
        expected_calibration_error(probabilities, labels), abs=1e-6
    )
    assert metrics["test_accuracy"] == pytest.approx(float((probabilities.argmax(1) == labels).mean()))
    for name, value in abstention_metrics(probabilities, labels).items():
        assert metrics[name] == pytest.approx(value, abs=1e-6, nan_ok=True), name
    # the guaranteed review thresholds: chosen on the stored validation predictions, checked on the test ones
    val = np.load(mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/predictions/val.npz"))
    guaranteed, _ = guarantee_metrics((val["probabilities"], val["labels"]), (probabilities, labels))
    assert metrics["abstention/calibration_images"] == len(val["labels"])
    for name, value in guaranteed.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6, nan_ok=True), name
    assert (
        0.0 <= metrics["abstention/coverage_at_99_accuracy"] <= metrics["abstention/coverage_at_95_accuracy"]
    )

    model = mlflow.keras.load_model(run.data.tags["model_uri"])
    # the temperature folded into the last Dense layer (issue 27): no custom layer, the softmax kept
    assert type(model.layers[-1]).__name__ == "Dense" and model.layers[-1].name == "probabilities"
    assert model.layers[-1].activation.__name__ == "softmax"
    assert all(type(layer).__module__.startswith("keras.") for layer in model._flatten_layers())
    from bloodcell.data import make_demo_set

    images, _ = make_demo_set(12, 32, 0)  # TINY's data set: data_index points into it
    logged = model.predict(images[stored["data_index"]].astype(np.float32), verbose=0)
    np.testing.assert_allclose(logged, probabilities, atol=1e-4)
    # and its stored validation predictions, kept from the final epoch's own validation pass (issue 29)
    logged = model.predict(images[val["data_index"]].astype(np.float32), verbose=0)
    np.testing.assert_allclose(logged, val["probabilities"], atol=1e-4)


def test_explain_writes_the_gradcam_and_error_sheets_for_the_run_s_model(quickstart_run, tmp_path):
    from PIL import Image

    from bloodcell.data import make_demo_set

    uri, run, _ = quickstart_run
    images, labels = make_demo_set(per_class=3, image_size=32, seed=9)
    np.savez(tmp_path / "cells.npz", images=images, labels=labels)
    out = tmp_path / "explained"
    proc = run_module(
        "bloodcell.explain",
        f"model=runs:/{run.info.run_id}/model",
        f"input={tmp_path / 'cells.npz'}",
        f"output={out}",
        "limit=20",
        f"tracking.uri={uri}",
    )
    assert_ok(proc)
    assert sorted(p.name for p in out.iterdir()) == ["errors.png", "gradcam.png"]  # no temporary file left
    for name in ("gradcam.png", "errors.png"):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.width > 300 and png.height > 300
    errors = int(proc.stdout.split(" errors among 20 labelled images")[0].split()[-1])
    assert 0 <= errors <= 20
    assert "feature map: backbone/conv_block4_relu2" in proc.stdout  # small_cnn's last conv, found inside


def test_a_run_logged_to_a_file_has_one_line_per_epoch_and_no_start_up_noise(quickstart_run):
    """Issue 16, items 6 and 9, end to end: a training run whose output goes to a file (SLURM, CI, `> log`),
    in the environment a new user has (no TF_CPP_MIN_LOG_LEVEL, no CUDA_VISIBLE_DEVICES set): the
    quickstart run above."""
    _, _, proc = quickstart_run
    log, errors = proc.stdout, proc.stderr
    assert proc.returncode == 0, errors[-3000:]
    assert "\r" not in log and "━" not in log  # no progress bar, redrawn or appended
    epochs = [line for line in log.splitlines() if " - val_accuracy: " in line]
    assert len(epochs) == 2, log  # one line per epoch: 1 epoch in each phase
    assert len(log.encode()) < 8_000, log  # a few KB (with Keras' bar, the quickstart demo wrote 47 KB)
    # no TensorFlow start-up noise on a CPU-only machine ...
    for noise in ("absl::InitializeLog", "I0000 ", "oneDNN custom operations", "failed call to cuInit"):
        assert noise not in errors, errors[-3000:]
    assert "test accuracy" in log + errors  # ... while bloodcell's own lines are there


def test_crash_after_run_start_marks_run_failed_with_reason(tracking, tmp_path):
    # a weights file that exists (so the checks before the run pass) but is no HDF5 file: the model build,
    # inside the run, fails (an unknown objective used to be the example; it is now refused before the run)
    broken = tmp_path / "broken_weights.h5"
    broken.write_bytes(b"not an HDF5 file")
    proc = run_module(
        "bloodcell.train",
        *TINY,
        "finetune.epochs=0",
        "backbone=mobilenet",
        "~backbone.kwargs.filters",
        f"backbone.weights={broken}",
        "backbone.input_size=32",
        f"tracking.uri={tracking}",
    )
    assert proc.returncode != 0
    (run,) = mlflow_runs(tracking, "quickstart")
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("OSError")  # h5py: "file signature not found"


def test_help_and_cfg_job_answer_without_training():
    proc = run_module("bloodcell.train", "--help")
    assert_ok(proc)
    assert "backbone:" in proc.stdout and "experiment:" in proc.stdout
    proc = run_module("bloodcell.train", "+experiment=effnetb2", "--cfg", "job")
    assert_ok(proc)
    assert "name: efficientnetb2" in proc.stdout and "input_size: 260" in proc.stdout


def test_effnetb2_recipe_runs_on_a_small_npz_and_logs_a_registrable_model(tiny_npz, tracking):
    """The issue's 'done when': the reference recipe, random weights, one epoch per phase, eager steps
    (tracing EfficientNetB2's steps doubled this test's time: 111 s -> 54 s eager)."""
    import mlflow

    proc = run_module(
        "bloodcell.train",
        "+experiment=effnetb2",
        f"data.path={tiny_npz}",
        "backbone.weights=null",
        "trainer.epochs=1",
        "finetune.epochs=1",
        "trainer.verbose=0",
        "backbone.input_size=96",
        "trainer.run_eagerly=true",
        f"tracking.uri={tracking}",
    )
    assert_ok(proc)
    (run,) = mlflow_runs(tracking, "effnetb2")
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone.name"] == "efficientnetb2"
    version = mlflow.register_model(run.data.tags["model_uri"], "effnetb2-test")
    assert str(version.version) == "1"


@needs_shared_weights
def test_mobilenet_with_the_shared_imagenet_weights(tracking):
    """Pretrained weights from a file: phase 1 freezes the backbone, phase 2 unfreezes its top blocks."""
    proc = run_module(
        "bloodcell.train",
        "+experiment=mobilenet_cpu",
        "data=demo",
        "data.image_size=32",
        "data.per_class=12",
        "backbone.input_size=32",
        f"backbone.weights={SHARED_WEIGHTS}",
        "trainer.epochs=1",
        "finetune.epochs=1",
        "finetune.unfreeze_blocks=2",
        "trainer.verbose=0",
        f"tracking.uri={tracking}",
    )
    assert_ok(proc)
    (run,) = mlflow_runs(tracking, "mobilenet_cpu")
    assert run.info.status == "FINISHED"
    assert "phase 1: 1 epochs, backbone frozen" in proc.stdout + proc.stderr
    # blocks 12 and 13 of MobileNet: dw + pw convs (BatchNorm stays frozen) -> 4 layers with weights
    assert run.data.metrics["finetune_trainable_layers"] == 4
    # the preset also scores the test split and validation with test-time augmentation, and says which helps
    assert 0.0 <= run.data.metrics["test_tta_accuracy"] <= 1.0 and "test_tta_macro_f1" in run.data.metrics
    assert 0.0 <= run.data.metrics["final_val_tta_accuracy"] <= 1.0
    assert "test-time augmentation: validation accuracy" in proc.stdout + proc.stderr


def test_data_clean_true_removes_unwanted_samples_and_reports_to_mlflow(tmp_path, tracking):
    """Duplicates and a blank frame in the training file are removed before the split; counts and the
    report land in the run."""
    import mlflow

    from bloodcell.data import make_demo_set
    from tests.helpers import write_npz

    images, labels = make_demo_set(per_class=10, image_size=32, seed=2)
    images = np.concatenate([images, images[:4], np.full((1, 32, 32, 3), 255, np.uint8)])
    labels = np.concatenate([labels, labels[:4], [0]])
    path = write_npz(tmp_path / "polluted.npz", images, labels.astype(np.uint8).reshape(-1, 1))
    proc = run_module(
        "bloodcell.train",
        *TINY,
        "data=npz",
        f"data.path={path}",
        "data.clean=true",
        "finetune.epochs=0",
        f"tracking.uri={tracking}",
    )
    assert_ok(proc)
    (run,) = mlflow_runs(tracking, "quickstart")
    assert run.data.metrics["data/cleaning_removed"] >= 5
    report = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/cleaning/report.json")
    assert report["n_input"] == 85 and report["n_removed"] == run.data.metrics["data/cleaning_removed"]
    assert run.data.tags["data_fingerprint"] != run.data.tags["data_fingerprint_cleaned"]
    assert "cleaning/removed.png" in {
        a.path for a in mlflow.MlflowClient(tracking).list_artifacts(run.info.run_id, "cleaning")
    }
