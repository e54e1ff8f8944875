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
