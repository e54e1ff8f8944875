"""`python -m bloodcell.sync`: send what training runs on this machine could not send to an unreachable
MLflow tracking server (metrics, tags, artifacts, the model, the run's end status), to the same runs.

    python -m bloodcell.sync tracking.uri=http://mlflow-host:5000 [checkpoint_dir=...]

Runs keep those records in ``<checkpoints root>/<run id>/outbox/`` (bloodcell.tracking.outbox); every
training command also sends them when it starts. Exit status 1 while anything is still waiting.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from bloodcell import PROJECT_ROOT
from bloodcell.core.cli import exit_now, run_or_exit


def sync(cfg: DictConfig) -> int:
    """Send every waiting outbox; returns how many records are still waiting."""
    from bloodcell import tracking

    # a waiting model is loaded to be logged: Keras must know the layer a calibrated model ends with
    from bloodcell.serving.submission_template import TemperatureScaling  # noqa: F401
    from bloodcell.training import checkpoints

    uri = tracking.connect(cfg.tracking)
    root = checkpoints.root_for(uri, cfg.checkpoint_dir)
    results = tracking.send_waiting(root)
    if not results:
        print(f"nothing waiting under {root}")
    for run_id, left in results:
        print(f"run {run_id}: {'all records sent' if not left else f'{left} records still waiting'}")
    return sum(left for _, left in results)


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="sync")
def main(cfg: DictConfig) -> None:
    if run_or_exit(sync, cfg):
        sys.exit(1)


if __name__ == "__main__":
    main()
    exit_now()  # done: skip the interpreter's teardown
