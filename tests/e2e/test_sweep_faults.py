"""Faults the chaos soak (benchmarks/chaos.py, issue 26) found a sweep did not survive, one test each: the
sweep, as a user runs it, hit by one fault at one moment, then both stores checked."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.e2e.test_sweep import load_study, mlflow_runs, states, sweep_args
from tests.helpers import Started


def _workers(sweep: subprocess.Popen) -> list[int]:
    """The sweep's joblib (loky) worker processes."""
    import psutil

    found = []
    for child in psutil.Process(sweep.pid).children(recursive=True):
        try:
            line = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "loky" in line and "resource_tracker" not in line:
            found.append(child.pid)
    return sorted(found)


def _wait_for_a_report(sweep: subprocess.Popen, storage: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sweep.poll() is None:
        time.sleep(0.5)
        try:
            if any(t.intermediate_values for t in load_study(storage).trials if t.state.name == "RUNNING"):
                return
        except KeyError:  # no study yet
            continue
    raise AssertionError("no trial reported an epoch while the sweep ran")


@pytest.mark.slow
def test_a_killed_trial_process_goes_back_in_the_queue_and_the_sweep_goes_on(tmp_path):
    """SIGKILL of one joblib worker broke the whole batch (TerminatedWorkerError) and took the sweep down
    with it; now the batch's trials are requeued and resumed by the same sweep process."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = (
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra/launcher=joblib",
        "trainer.epochs=2",
        "finetune.epochs=0",
        "hydra.sweeper.pruner.name=none",
    )
    # output to files (Started), not a pipe nobody reads while the test polls the study
    with Started("bloodcell.train", *sweep_args(tmp_path, *args, storage=storage), cwd=tmp_path) as sweep:
        _wait_for_a_report(sweep.process, storage)
        os.kill(_workers(sweep.process)[0], signal.SIGKILL)
        proc = sweep.finish(timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "its job process was lost (TerminatedWorkerError)" in output
    study = load_study(storage)
    assert states(study) == {"COMPLETE": 2}
    assert any(t.user_attrs.get("interruptions") == 1 for t in study.trials)
    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["trial_number"] for c in children) == ["0", "1"]  # one run per trial
    assert {c.info.status for c in children} == {"FINISHED"}
