"""A live run's outbox is sent by that run alone (issue 26, found by the chaos soak): a trial starting beside
it sent the other run's waiting records as well (`send_waiting` at every run's start), so records went
twice and one sender removed the file the other was sending (the live trial ended FAIL on
FileNotFoundError). Real MLflow store (SQLite), no subprocess."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from bloodcell.tracking import has_waiting, send_waiting
from bloodcell.tracking.outbox import Outbox
from tests.helpers import mlflow_at, sqlite_store


def test_send_waiting_leaves_a_live_runs_outbox_to_its_run_and_sends_it_once_the_run_is_gone(
    tmp_path,
):
    uri = sqlite_store(tmp_path / "mlflow.db")
    with mlflow_at(uri):
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("outbox")).info.run_id
        root = tmp_path / "checkpoints"
        live = Outbox(run_id, root / run_id / "outbox")
        assert not has_waiting(root)
        live.add({"kind": "tags", "tags": {"sent_by": "whoever"}})
        assert has_waiting(root)
        assert live.hold()  # the run's own process, still training

        assert send_waiting(root) == []  # another command: not its records to send
        assert len(live.pending()) == 1 and "sent_by" not in client.get_run(run_id).data.tags

        live.release()  # the run's process ended (or was killed: the kernel lets go of its lock)
        assert send_waiting(root) == [(run_id, 0)]
        assert client.get_run(run_id).data.tags["sent_by"] == "whoever"
        assert not has_waiting(root)
