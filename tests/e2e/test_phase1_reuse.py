"""Phase-1 reuse across runs (issue 19, training/phase1_cache.py), as `python -m bloodcell.train` runs.

Four tiny runs on one MLflow store and one checkpoint root (A first, then B, C and D side by side): A trains
phase 1 and stores it; B (another phase-2 learning rate and augmentation strength) reuses it; C is B with
``trainer.reuse_phase1=false`` and must reach B's results, which shows B entered phase 2 in the state that
training phase 1 gives; D (another seed) misses. The parallel case (two trials of a sweep on a cold cache)
is in test_sweep.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import TINY, Started, assert_ok, mlflow_runs, run_module, sqlite_store

TWO_EPOCHS = [*TINY, "trainer.epochs=2", "finetune.epochs=2", "tracking.log_model=false"]
PHASE2 = ["finetune.lr=5e-4", "finetune.augmentation_strength=0.2"]  # phase 1: quickstart's strength 0.5


def metric_history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow
def test_second_run_reuses_phase1_and_fine_tunes_as_if_it_had_trained_it(tmp_path: Path) -> None:
    uri = sqlite_store(tmp_path / "mlruns" / "mlflow.db")
    proc = run_module("bloodcell.train", *TWO_EPOCHS, f"tracking.uri={uri}")  # A trains phase 1, stores it
    assert_ok(proc)
    logs = {"A": proc.stdout + proc.stderr}
    (first,) = mlflow_runs(uri, "quickstart")
    runs = {"A": first.info.run_id}
    # then B, C and D side by side: B reads A's entry, C does not look, D's seed is another key
    later = {
        "B": PHASE2,
        "C": [*PHASE2, "trainer.reuse_phase1=false"],
        "D": [*PHASE2, "seed=1"],
    }
    args = [*TWO_EPOCHS, f"tracking.uri={uri}"]
    started = {name: Started("bloodcell.train", *args, *extra) for name, extra in later.items()}
    finished = {name: process.finish() for name, process in started.items()}
    for name, proc in finished.items():
        assert_ok(proc)
        logs[name] = proc.stdout + proc.stderr
    for run in mlflow_runs(uri, "quickstart"):
        if run.info.run_id != runs["A"]:
            params = run.data.params
            reuse = params["trainer.reuse_phase1"].lower()
            name = "D" if params["seed"] == "1" else "C" if reuse == "false" else "B"
            assert name not in runs, (name, params)
            runs[name] = run.info.run_id
    assert sorted(runs) == ["A", "B", "C", "D"]

    client = MlflowClient(uri)
    a, b, c, d = (client.get_run(runs[n]) for n in "ABCD")
    # A trained and stored; B found A's entry under the same key; C did not look; D's seed is another key
    assert a.data.tags["phase1_reused"] == "false" and b.data.tags["phase1_reused"] == "true"
    assert b.data.tags["phase1_source_run"] == a.info.run_id
    assert b.data.tags["phase1_key"] == a.data.tags["phase1_key"] != d.data.tags["phase1_key"]
    assert d.data.tags["phase1_reused"] == "false" and "phase1_reused" not in c.data.tags
    assert "phase 1: reused from run " + a.info.run_id in logs["B"]
    entries = sorted(p.name for p in (tmp_path / "mlruns" / "checkpoints" / "phase1").iterdir() if p.is_dir())
    assert entries == sorted([a.data.tags["phase1_key"], d.data.tags["phase1_key"]])
    assert b.data.metrics["phase1_reused_epochs"] == 2 and b.data.metrics["phase1_saved_seconds"] > 0

    # B trained no phase-1 epoch (throughput is measured only for epochs a run trains) ...
    throughput = "time/train_images_per_second"
    assert sorted(metric_history(client, a.info.run_id, throughput)) == [0, 1, 2, 3]
    assert sorted(metric_history(client, b.info.run_id, throughput)) == [2, 3]
    # ... and holds A's phase-1 curves at the same steps, then its own phase 2
    for key in ("val_accuracy", "val_loss", "train_loss", "learning_rate"):
        assert {s: v for s, v in metric_history(client, b.info.run_id, key).items() if s < 2} == {
            s: v for s, v in metric_history(client, a.info.run_id, key).items() if s < 2
        }, key
    # the other phase-2 settings did act: B's phase 2 is not A's
    assert metric_history(client, b.info.run_id, "learning_rate")[2] != pytest.approx(
        metric_history(client, a.info.run_id, "learning_rate")[2]
    )

    # C trained phase 1 itself and, with the same phase 2, ended where B ended: same start of phase 2
    for key in ("val_accuracy", "val_loss", "train_loss"):
        hb, hc = metric_history(client, b.info.run_id, key), metric_history(client, c.info.run_id, key)
        assert sorted(hb) == sorted(hc) == [0, 1, 2, 3], key
        for step in hb:
            assert math.isclose(hb[step], hc[step], rel_tol=1e-5, abs_tol=1e-6), (key, step, hb, hc)
    for key in ("test_accuracy", "test_macro_f1", "best_val_accuracy"):
        assert math.isclose(b.data.metrics[key], c.data.metrics[key], rel_tol=1e-5, abs_tol=1e-6), key
