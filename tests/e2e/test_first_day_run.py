"""Issue 16, items 6 and 9, end to end: a training run whose output goes to a file (SLURM, CI, `> log`), in
the environment a new user has (no TF_CPP_MIN_LOG_LEVEL, no CUDA_VISIBLE_DEVICES set)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO, TINY_TRACED

# what a user's shell has: none of the tests' own quieting
USER_ENV = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}


def test_a_run_logged_to_a_file_has_one_line_per_epoch_and_no_start_up_noise(tmp_path):
    args = [o for o in TINY_TRACED if not o.startswith("trainer.verbose")]  # the default: verbose=auto
    out, err = tmp_path / "log.out", tmp_path / "log.err"
    with out.open("w") as stdout, err.open("w") as stderr:  # files, not a terminal
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bloodcell.train",
                *args,
                "tracking.log_model=false",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                f"hydra.run.dir={tmp_path / 'run'}",
            ],
            cwd=REPO,
            env=USER_ENV,
            stdout=stdout,
            stderr=stderr,
            timeout=600,
        )
    log, errors = out.read_text(), err.read_text()
    assert proc.returncode == 0, errors[-3000:]
    assert "\r" not in log and "━" not in log  # no progress bar, redrawn or appended
    epochs = [line for line in log.splitlines() if " - val_accuracy: " in line]
    assert len(epochs) == 2, log  # one line per epoch: 1 epoch in each phase
    assert len(log.encode()) < 8_000, log  # a few KB (with Keras' bar, the quickstart demo wrote 47 KB)
    # no TensorFlow start-up noise on a CPU-only machine ...
    for noise in ("absl::InitializeLog", "I0000 ", "oneDNN custom operations", "failed call to cuInit"):
        assert noise not in errors, errors[-3000:]
    assert "test accuracy" in log + errors  # ... while bloodcell's own lines are there
