"""The start-up check of an http tracking server (bloodcell.tracking.check_reachable) against a real local
HTTP server: a URL with user info reaches it (issue 26: urllib took ``alice:pw@host`` for the host name),
and a sweep's trial waits for a server that is restarting instead of failing (the chaos soak)."""

from __future__ import annotations

import base64
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bloodcell.core.errors import UserError
from bloodcell.core.settings import TrackingSchema
from bloodcell.tracking import check_reachable, patient_requests, server_wait
from tests.helpers import free_port


class _Health(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:
        _Health.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


def _serve(port: int, after: float = 0.0) -> ThreadingHTTPServer:
    if after:
        time.sleep(after)
    server = ThreadingHTTPServer(("127.0.0.1", port), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_tracking_url_with_user_info_reaches_its_server_with_basic_auth():
    port = free_port()
    server = _serve(port)
    try:
        _Health.seen.clear()
        check_reachable(f"http://alice:p%40ss@127.0.0.1:{port}")
        expected = "Basic " + base64.b64encode(b"alice:p@ss").decode()
        assert _Health.seen == [("/health", expected)]
    finally:
        server.shutdown()


def test_a_sweep_trial_waits_for_a_restarting_server_and_a_run_does_not():
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(UserError, match="is unreachable"):
        check_reachable(uri)  # a user's run: one line at once
    trial = TrackingSchema.of({"uri": uri, "parent_run_id": "abc", "outage_wait_seconds": 60})
    assert server_wait(TrackingSchema.of({"uri": uri})) == 0 and server_wait(trial) == 60
    started: list[ThreadingHTTPServer] = []
    thread = threading.Thread(target=lambda: started.append(_serve(port, after=3)))
    thread.start()
    try:
        begun = time.monotonic()
        check_reachable(uri, wait=server_wait(trial))
        assert 2.5 < time.monotonic() - begun < 30
    finally:
        thread.join()
        for server in started:
            server.shutdown()


def test_a_sweep_trials_look_ups_before_its_run_wait_out_a_server_restart(monkeypatch):
    """The soak's last finding: a trial's look-ups before its run starts (its ended or unfinished runs)
    met a restarting server with the run's 2 quick retries and ended FAIL."""
    import os

    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    trial = TrackingSchema.of({"uri": uri, "parent_run_id": "abc"})
    started: list[ThreadingHTTPServer] = []
    thread = threading.Thread(target=lambda: started.append(_serve(port, after=4)))
    thread.start()
    try:
        with patient_requests(trial):
            assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "6"
            response = http_request(MlflowHostCreds(uri), "/health", "GET")
        assert response.status_code == 200
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # the run's own, once it has started
    finally:
        thread.join()
        for server in started:
            server.shutdown()


class _History(BaseHTTPRequestHandler):
    """MLflow's REST answer to metrics/get-history: val_accuracy logged at step 3."""

    def do_GET(self) -> None:
        body = b'{"metrics": [{"key": "val_accuracy", "value": 0.5, "timestamp": 0, "step": 3}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_resumed_trials_look_up_of_its_logged_epochs_waits_out_a_server_restart(monkeypatch):
    """The N = 40 soak (PostgreSQL, seed 2): two trials killed by a fault were requeued, and as they resumed
    their look-up of the epochs their run had logged met the server restarting after another fault; with
    the run's 2 quick retries both ended FAIL. A sweep's trial now waits about a minute; a user's run does
    not wait."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from bloodcell.tracking import logged_steps

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(MlflowException, match="Max retries exceeded"):
            logged_steps("r1", "val_accuracy", TrackingSchema.of({"uri": uri}))  # a user's run: at once
        restarted_look_up(port, TrackingSchema.of({"uri": uri, "parent_run_id": "abc"}))
    finally:
        mlflow.set_tracking_uri(previous)


def restarted_look_up(port: int, trial: TrackingSchema) -> None:
    """The server comes up 5 s into the trial's look-up, which gets its answer."""
    from bloodcell.tracking import logged_steps

    started: list[ThreadingHTTPServer] = []

    def restart() -> None:
        time.sleep(5)
        server = ThreadingHTTPServer(("127.0.0.1", port), _History)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        assert logged_steps("r1", "val_accuracy", trial) == {3}
    finally:
        thread.join()
        for server in started:
            server.shutdown()


def test_a_sweep_trials_run_starts_through_a_server_restart(tmp_path, monkeypatch):
    """The N = 40 soak (PostgreSQL, seed 2, after the fix above): a requeued trial was creating its run
    (MLflow looks its parent run up first, `runs/get`) when the server was killed and restarted; with the
    run's 2 quick retries the trial ended FAIL. Its run's start now waits out the restart as its look-ups
    do. A real mlflow server, killed and started again 6 s later."""
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from bloodcell.core.settings import TrialSchema
    from bloodcell.tracking import start_run
    from tests.helpers import RestartingServer, mlflow_at

    with RestartingServer(tmp_path / "server", free_port(), monkeypatch) as server, mlflow_at(server.uri):
        client = MlflowClient(server.uri)
        experiment_id = client.create_experiment("sweep")
        parent = client.create_run(experiment_id).info.run_id
        settings = TrackingSchema.of({"uri": server.uri, "parent_run_id": parent, "outage_wait_seconds": 60})
        trial = TrialSchema.of({"storage": "journal:x", "study_name": "s", "trial_id": 1, "number": 0})
        server.restart(after=6)
        cfg = OmegaConf.create({"seed": 1})
        with start_run(
            cfg,
            tags={},
            experiment_id=experiment_id,
            local_root=tmp_path / "runs",
            tracking_settings=settings,
            trial=trial,
        ) as recorder:
            run_id = recorder.run_id
        server.wait()
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.params["seed"] == "1" and run.data.tags["trial_number"] == "0"
