"""Which run a training command continues (``trainer.resume``), and the run state that makes it exact.

- ``trainer.resume=<run id>``: that run, from its newest checkpoint.
- ``trainer.resume=auto``: the newest unfinished run of the experiment with the same resolved config
  (``config_digest`` tag) and data fingerprint that has a checkpoint; a new run when there is none.
- In a sweep every trial resumes by itself: a trial that a killed sweep left behind (put back in the
  study's queue by the sweeper) continues its own MLflow run from its checkpoint.

Before looking, runs of this host left RUNNING by a process that no longer exists (SIGKILL, OOM killer)
are marked KILLED with the reason (`bloodcell.tracking.mark_dead_runs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bloodcell import tracking
from bloodcell.core.errors import UserError, is_prune
from bloodcell.core.settings import TrackingSchema, TrainerSchema, TrainSchema, TrialSchema
from bloodcell.training import checkpoints
from bloodcell.training.run_data import RunData

log = logging.getLogger("bloodcell.train")

#: config keys that name where or how a run is recorded or continued, not what it trains
_NOT_IN_DIGEST = ("trial", "tracking")


def config_digest(cfg: Any) -> str:
    """sha256 of the resolved config without the keys that do not change what is trained."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain = {k: v for k, v in plain.items() if k not in _NOT_IN_DIGEST}
    plain["trainer"] = {
        k: v for k, v in plain["trainer"].items() if k not in ("resume", "verbose", "checkpoint")
    }
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Resume:
    run_id: str
    checkpoint: checkpoints.Checkpoint

    @property
    def next_epoch(self) -> int:
        return self.checkpoint.epoch + 1


def find_resumable(
    wanted: str | None,
    trial: TrialSchema | None,
    digest: str,
    experiment_id: str,
    data_fingerprint: str,
    root: Path,
) -> Resume | None:
    """The run to continue and its newest checkpoint, or None for a new run (see the module docstring):
    ``wanted`` is ``trainer.resume``, ``trial`` the sweep's trial, ``digest`` the run's `config_digest`."""
    tracking.mark_dead_runs(experiment_id)
    if trial is not None:
        # also RUNNING: a requeued SLURM job may land on another host, where its dead run cannot be checked
        trial_tags = {"optuna_trial_id": str(trial.trial_id), "optuna_study": str(trial.study_name)}
        candidates = tracking.unfinished_runs(experiment_id, trial_tags, include_running=True)
    elif not wanted:
        return None
    elif wanted == "auto":
        candidates = tracking.unfinished_runs(
            experiment_id, {"config_digest": digest, "data_fingerprint": data_fingerprint}
        )
    else:
        return _explicit(wanted, data_fingerprint, root)
    for run_id in candidates:
        checkpoint = checkpoints.latest(root / run_id)
        if checkpoint is not None:
            return Resume(run_id, checkpoint)
    if trial is not None:
        _drop_empty_trial_runs(candidates)
    if wanted == "auto":
        log.info(
            "trainer.resume=auto: no unfinished run of this config with a checkpoint; starting a new run"
        )
    return None


def ended_trial_outcome(settings: TrainSchema) -> float | None:
    """The outcome of this sweep trial's run if that run ended already: its job ended, but its sweep
    process was killed before it told Optuna, so the trial came back in the queue (issue 26, the chaos
    soak: trained again in a second run). Its objective (metric ``best_<objective>``) is returned again,
    or ``optuna.TrialPruned`` raised again; None when the trial has no ended run (train it)."""
    if settings.trial is None:
        return None
    trial = settings.trial
    experiment_id = tracking.setup_experiment(settings.tracking)
    # its end may still wait in its outbox: the job was killed while the tracking server was away
    uri = tracking.resolve_tracking_uri(settings.tracking)
    send_waiting_records(checkpoints.root_for(uri, settings.trainer.checkpoint.dir))
    tags = {"optuna_trial_id": str(trial.trial_id), "optuna_study": str(trial.study_name)}
    run = tracking.ended_trial_run(experiment_id, tags)
    if run is None:
        return None
    if run.info.status == "KILLED":  # pruned
        import optuna

        log.info(
            "run %s of this trial was pruned before its sweep recorded it: pruned again", run.info.run_id
        )
        raise optuna.TrialPruned(run.data.tags.get("pruned_reason", "pruned before the sweep recorded it"))
    value = run.data.metrics.get(f"best_{settings.objective}")
    if value is None:
        return None
    log.info(
        "run %s of this trial finished before its sweep recorded it: its %s %.4f stands",
        run.info.run_id, settings.objective, value,
    )  # fmt: skip
    return float(value)


def send_waiting_records(root: Path) -> None:
    """Send what earlier runs under the checkpoints ``root`` could not send to the server
    (`tracking.send_waiting`). A waiting model is loaded to be logged, so Keras must know the layer a
    calibrated model ends with; that import brings TensorFlow, so it is made only when something waits: a
    sweep trial checks this before its data are read, and the read overlaps the TensorFlow import that
    comes after (run_data)."""
    if not tracking.has_waiting(root):
        return
    from bloodcell.serving.submission_template import TemperatureScaling  # noqa: F401

    tracking.send_waiting(root)


def _drop_empty_trial_runs(run_ids: list[str]) -> None:
    """A sweep trial's earlier runs that were stopped before their first epoch ended (a killed job: no
    checkpoint and no epoch recorded) hold nothing to continue; the trial starts a new run, so they go to
    MLflow's trash, or the trial would have two child runs. A run with recorded epochs is kept (its
    checkpoints may be on another host's disk)."""
    for run_id in run_ids:
        if not tracking.logged_steps(run_id, "train_loss"):
            tracking.delete_run(run_id)
            log.info("run %s of this trial was stopped before its first epoch ended: deleted", run_id)


def _explicit(run_id: str, data_fingerprint: str, root: Path) -> Resume:
    status, tags = tracking.run_status(run_id)
    if status is None:
        raise UserError(
            f"trainer.resume={run_id}: no such run in this store; use a run id or trainer.resume=auto"
        )
    if status == "FINISHED":
        raise UserError(f"trainer.resume={run_id}: that run already FINISHED; there is nothing to resume")
    if tags.get("data_fingerprint") != data_fingerprint:
        raise UserError(
            f"trainer.resume={run_id}: that run trained on other data (fingerprint "
            f"{tags.get('data_fingerprint', '?')[:12]}, now {data_fingerprint[:12]}); "
            "use the same data.* settings"
        )
    checkpoint = checkpoints.latest(root / run_id)
    if checkpoint is None:
        raise UserError(
            f"trainer.resume={run_id}: no checkpoint under {root / run_id} "
            "(trainer.checkpoint.every=0, or it was deleted); start a new run"
        )
    return Resume(run_id, checkpoint)


@dataclass
class CheckpointDirs:
    """Where a run's checkpoints go (``<root>/<run id>``) and when they are deleted: when the run finishes
    or is pruned (nothing left to resume), unless ``trainer.checkpoint.keep_after_finish``."""

    root: Path
    keep_after_finish: bool = False

    @contextlib.contextmanager
    def checkpointing(self, run_id: str) -> Iterator[Path]:
        try:
            yield self.root / run_id
        except BaseException as err:
            if is_prune(err):
                checkpoints.delete(self.root / run_id)
            raise

    def finished(self, run_id: str) -> None:
        """The run ended: its checkpoints go (unless kept); the folder stays while records wait for the
        tracking server in its outbox (they need the saved model)."""
        if self.keep_after_finish:
            return
        if tracking.outbox_waiting(self.root / run_id):
            checkpoints.delete_epochs(self.root / run_id)
        else:
            checkpoints.delete(self.root / run_id)


def start_or_resume(
    tracking_settings: TrackingSchema,
    trainer: TrainerSchema,
    trial: TrialSchema | None,
    digest: str,
    data: RunData,
) -> tuple[str, Resume | None, CheckpointDirs]:
    """The MLflow experiment (``tracking``), the run to continue (``trainer.resume``, or a sweep ``trial``
    that a killed sweep left unfinished; None for a new run), and where the run's checkpoints go
    (``trainer.checkpoint``). ``digest``: the run's `config_digest`."""
    experiment_id = tracking.setup_experiment(tracking_settings)
    root = checkpoints.root_for(tracking.resolve_tracking_uri(tracking_settings), trainer.checkpoint.dir)
    dirs = CheckpointDirs(root, trainer.checkpoint.keep_after_finish)
    send_waiting_records(dirs.root)
    resume = find_resumable(trainer.resume, trial, digest, experiment_id, data.arrays.fingerprint, dirs.root)
    if resume is not None:
        log.info(
            "resuming run %s after epoch %d (%s)",
            resume.run_id,
            resume.checkpoint.epoch,
            resume.checkpoint.state["phase"],
        )
    return experiment_id, resume, dirs
