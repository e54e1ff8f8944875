"""A busy tracking server answers a create-run request too late: MLflow's client retries it, the server
creates the run again, and a trial showed up two or three times in the MLflow UI (seen in CI: one trial of a
two-sweep study had three child runs). bloodcell deletes the empty copies."""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import free_port, start_mlflow_server, stop_mlflow_server

CLIENT_TIMEOUT = 3  # seconds: MLFLOW_HTTP_REQUEST_TIMEOUT for this test


def _slow_first_create_proxy(upstream_port: int) -> ThreadingHTTPServer:
    """A proxy in front of the server that passes every request on, but answers the first create-run
    request only after the client has given up on it (the server has created the run by then)."""
    delayed: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            payload = answer.read()
            if self.path.endswith("/runs/create") and not delayed:
                delayed.append(self.path)
                time.sleep(CLIENT_TIMEOUT + 2)
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            # the client gave up on the delayed one
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_DELETE = do_HEAD = _forward

        def log_message(self, *args: object) -> None:
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy


@pytest.mark.slow
def test_a_create_run_retried_by_the_client_leaves_one_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import mlflow
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from bloodcell import tracking
    from bloodcell.tracking.run import START_TOKEN_TAG

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(CLIENT_TIMEOUT))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    port = free_port()
    server = start_mlflow_server(tmp_path / "server", port)
    proxy = _slow_first_create_proxy(port)
    try:
        uri = f"http://127.0.0.1:{proxy.server_address[1]}"
        cfg = OmegaConf.create(
            {
                "seed": 1,
                "tracking": {
                    "uri": uri,
                    "experiment": "retries",
                    "run_name": "one-run",
                    "parent_run_id": None,
                    "system_metrics_seconds": None,
                    "outage_wait_seconds": 5,
                },
            }
        )
        with tracking.start_run(cfg, tags={}, local_root=tmp_path / "local") as recorder:
            recorder.log_metrics({"accuracy": 0.5})
        mine = recorder.run_id

        client = MlflowClient(f"http://127.0.0.1:{port}")  # the server itself, behind no proxy
        experiment = client.get_experiment_by_name("retries")
        everything = client.search_runs([experiment.experiment_id], run_view_type=3)  # ViewType.ALL
        live = client.search_runs([experiment.experiment_id])
        # the delayed request did create a run: the client's retry made a second one, which was deleted
        assert len(everything) == 2, [(r.info.run_id, r.info.lifecycle_stage) for r in everything]
        assert [r.info.run_id for r in live] == [mine]
        assert live[0].info.status == "FINISHED" and live[0].data.metrics["accuracy"] == 0.5
        [copy] = [r for r in everything if r.info.run_id != mine]
        assert copy.info.lifecycle_stage == "deleted"
        assert copy.data.tags[START_TOKEN_TAG] == live[0].data.tags[START_TOKEN_TAG]
    finally:
        mlflow.set_tracking_uri(None)
        proxy.shutdown()
        stop_mlflow_server(server)
