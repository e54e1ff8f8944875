"""A full disk while the model is uploaded (issue 14): the run ends FAILED naming a loadable local copy,
and no truncated model file stays under a final name in the artifact store."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import TINY, mlflow_runs, run_module, sqlite_store


@pytest.fixture
def small_artifact_disk(tmp_path):
    """A 1 MiB tmpfs as the store's artifact folder: the run's plots fit, its ~3 MB model does not."""
    artifacts = tmp_path / "store" / "artifacts"
    artifacts.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(artifacts)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield artifacts
    subprocess.run(["umount", "-l", str(artifacts)], check=False)


def test_disk_full_while_the_model_is_logged_leaves_a_loadable_local_copy_and_a_failed_run(
    tmp_path, small_artifact_disk
):
    import keras

    store = sqlite_store(tmp_path / "store" / "mlflow.db")
    proc = run_module(
        "bloodcell.train", *TINY, f"tracking.uri={store}", f"trainer.checkpoint.dir={tmp_path / 'ck'}"
    )
    assert proc.returncode != 0
    (run,) = mlflow_runs(store, "quickstart")
    assert run.info.status == "FAILED"
    error = run.data.tags["error"]
    assert "a loadable copy is at" in error, error
    local = error.rsplit("a loadable copy is at ", 1)[1].strip()
    import bloodcell.evaluation.calibration  # noqa: F401  (registers the temperature layer the calibrated model ends with)

    assert keras.saving.load_model(local, compile=False).output_shape == (None, 8)
    assert not list(small_artifact_disk.rglob("model.keras"))  # nothing truncated under the final name
    assert not list(small_artifact_disk.rglob("*.tmp*"))
