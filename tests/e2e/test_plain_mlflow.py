"""A registered bloodcell model in plain MLflow's hands (issue 27): loaded with `mlflow.pyfunc.load_model` and
`mlflow.keras.load_model` in a fresh Python that cannot import bloodcell, served by `mlflow models serve`
and scored by `mlflow models predict`, each giving the probabilities bloodcell's predict gives.

One copy of the session's tiny runs (tests/tiny_runs.py): the calibrated quickstart run, registered as
``bloodcell-demo@champion``, and member B (calibrated, resizing its 32 px cells to 48 px inside the model).
The server is started once for the module, at its start, so that it boots while the other checks run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.helpers import free_port
from tests.plain_mlflow import assert_plain_keras, fresh_load, plain_env

NAME = "bloodcell-demo"
CELLS = 6  # cells POSTed to the server
ATOL = 1e-5  # float32 probabilities, computed by the same model in other processes


@pytest.fixture(scope="module")
def store(tiny_runs, tmp_path_factory):
    """The store's copy with the quickstart run registered as the champion, its test images and stored test
    predictions, bloodcell's own predictions, and `mlflow models serve` booting on a free port."""
    import mlflow

    from bloodcell.evaluation.stored_predictions import stored_predictions
    from bloodcell.serving.loading import load_model
    from bloodcell.serving.prediction import predict_arrays
    from bloodcell.training.run_data import split_images

    root = tmp_path_factory.mktemp("plain_mlflow")
    uri = tiny_runs.copy(root)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(tiny_runs.quickstart)
    assert run.data.metrics["calibration/temperature"] > 0  # a calibrated model: the case that failed
    mlflow.set_tracking_uri(
        uri
    )  # registering a logged model (models:/m-...) looks it up in MLflow's current store
    version = mlflow.register_model(run.data.tags["model_uri"], NAME)
    client.set_registered_model_alias(NAME, "champion", version.version)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion"]
        + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        cwd=root,
        env=plain_env(uri),
        stdout=subprocess.DEVNULL,
        stderr=open(root / "serve.log", "w"),  # noqa: SIM115 (closed with the process)
    )
    try:
        stored = {r: stored_predictions(client, r, "test") for r in (tiny_runs.quickstart, tiny_runs.b)}
        images = split_images(run, "test", stored[tiny_runs.quickstart].data_index)
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        ours = {
            r: predict_arrays(load_model(f"runs:/{r}/model", tracking_uri=uri), images)
            for r in (tiny_runs.quickstart, tiny_runs.b)
        }
        yield SimpleNamespace(
            root=root,
            uri=uri,
            runs=tiny_runs,
            images=images,
            stored=stored,
            ours=ours,
            port=port,
            server=server,
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_a_fresh_python_without_bloodcell_loads_the_logged_models_and_gets_predicts_probabilities(store):
    quickstart, b = store.runs.quickstart, store.runs.b
    uris = [f"runs:/{quickstart}/model", f"runs:/{b}/model"]  # the champion's URI: served below
    loaded = fresh_load(uris, store.images, store.uri, store.root / "fresh")
    for uri, run_id in zip(uris, (quickstart, b)):
        got = loaded[uri]
        assert_plain_keras(got)
        # the input rule: cells as the data set stores them, at its size, whatever size the model computes at
        assert "'dtype': 'float32', 'shape': (-1, 32, 32, 3)" in got["signature"], got["signature"]
        stored = store.stored[run_id]
        # the data index order of the stored predictions is the images' order here
        np.testing.assert_allclose(got["pyfunc"], stored.probabilities, atol=ATOL)
        np.testing.assert_allclose(got["keras"], stored.probabilities, atol=ATOL)
        np.testing.assert_allclose(got["keras"], store.ours[run_id], atol=ATOL)
        np.testing.assert_array_equal(got["keras"].argmax(1), stored.probabilities.argmax(1))
        print(
            f"{uri}: max |fresh pyfunc - stored| {np.abs(got['pyfunc'] - stored.probabilities).max():.2e}, "
            f"|fresh keras - predict| {np.abs(got['keras'] - store.ours[run_id]).max():.2e}"
        )


def _wait_for(server: subprocess.Popen, port: int, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, (
            f"mlflow models serve exited {server.returncode}:\n{log.read_text()[-3000:]}"
        )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"mlflow models serve did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def _post(port: int, body: dict) -> np.ndarray:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)


def test_mlflow_models_predict_scores_the_champion_on_a_json_tensor(store):
    cells = store.images[:CELLS]
    (store.root / "cells.json").write_text(json.dumps({"inputs": cells.tolist()}))  # uint8 values 0-255
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", f"models:/{NAME}@champion"]
        + ["-i", "cells.json", "-t", "json", "-o", "out.json", "--env-manager", "local"],
        cwd=store.root,
        env=plain_env(store.uri),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads((store.root / "out.json").read_text())
    probabilities = np.asarray(written["predictions"] if isinstance(written, dict) else written, np.float32)
    assert probabilities.shape == (CELLS, 8)
    np.testing.assert_allclose(probabilities, store.ours[store.runs.quickstart][:CELLS], atol=ATOL)
    difference = np.abs(probabilities - store.ours[store.runs.quickstart][:CELLS]).max()
    print(f"max |models predict - predict| {difference:.2e}")


def test_mlflow_models_serve_answers_a_json_tensor_of_cells_with_predicts_probabilities(store):
    _wait_for(store.server, store.port, store.root / "serve.log")
    cells = store.images[:CELLS]
    expected = store.ours[store.runs.quickstart][:CELLS]
    as_stored = _post(store.port, {"inputs": cells.tolist()})  # the uint8 cells' values, as JSON integers
    assert as_stored.shape == (CELLS, 8)
    np.testing.assert_allclose(as_stored, expected, atol=ATOL)
    as_floats = _post(store.port, {"inputs": cells.astype(np.float32).tolist()})  # 0.0-255.0
    np.testing.assert_allclose(as_floats, expected, atol=ATOL)
    np.testing.assert_allclose(as_stored.sum(axis=1), 1.0, atol=1e-5)
    difference = max(np.abs(as_stored - expected).max(), np.abs(as_floats - expected).max())
    print(f"max |served - predict| {difference:.2e}")
