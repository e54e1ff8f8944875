"""The sweep loop: ask Optuna for a batch of trials, launch them through Hydra's launcher, tell Optuna
how each ended, and keep the study's MLflow parent run up to date.

How ``n_trials`` stays a total over resumed runs and parallel sweep processes: a trial counts when it is
running or ended (complete, pruned, or failed by its own error); a trial whose sweep process died
(SIGKILL, a lost node) or was stopped goes back into Optuna's queue (WAITING) with its parameters and
pruning reports, and the next ask runs it again: its training resumes from its last checkpoint in its
own MLflow run (``MAX_INTERRUPTIONS`` times; then it is marked FAIL + ``interrupted``, does not count,
and its place is run anew). Before each ask, a process counts the trials under a file lock beside
a local storage (journal / SQLite), so processes on one machine never ask one trial too many; on a
database server it asks first and, when its trial ranks beyond ``n_trials``, puts it back in Optuna's
queue (WAITING) for whoever needs a trial next.

A running trial carries its sweep process (host, pid) and a heartbeat time as system attributes. It is
interrupted when that process is gone from this host, or, when it runs on another host, its heartbeat is
4 intervals old.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import optuna
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from bloodcell import __version__
from bloodcell.core.errors import UserError
from bloodcell.core.redaction import has_secret, mask_secrets, mask_text
from bloodcell.sweep.tables import make_pruner, make_sampler
from bloodcell.sweep.trial import PRUNER_ATTR, lock_path, open_storage, redact, resolve_storage_url
from bloodcell.tracking import git_tags, record_to, version_tags

from ._search_space import grid_of, parse_search_space
from .config import BloodcellOptunaSweeperConf

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

OWNER_ATTR = "bloodcell:owner"
HEARTBEAT_ATTR = "bloodcell:heartbeat"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
RUNS_ATTR = "bloodcell:sweep_runs"
STALE_AFTER_BEATS = 4
#: a trial interrupted this often is given up (FAIL) rather than queued again: it may be what kills its job
MAX_INTERRUPTIONS = 3


@dataclass
class Claimed:
    """A trial this process took from the study: the Optuna trial, and its storage id (Optuna's Trial keeps
    the id private; the trial process reopens the trial by it, and the storage's methods take it)."""

    id: int
    trial: optuna.trial.Trial


def counts_toward_total(trial: FrozenTrial) -> bool:
    if trial.state == TrialState.FAIL:
        return "interrupted" not in trial.user_attrs
    return trial.state != TrialState.WAITING


def summary_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    counts = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "interrupted": 0}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            counts["complete"] += 1
        elif t.state == TrialState.PRUNED:
            counts["pruned"] += 1
        elif t.state == TrialState.RUNNING:
            counts["running"] += 1
        elif t.state == TrialState.FAIL:
            counts["interrupted" if "interrupted" in t.user_attrs else "failed"] += 1
    return counts


def phase1_savings(trials: list[FrozenTrial]) -> dict[str, float]:
    """How many trials started phase 2 from a stored phase 1 (`bloodcell.training.phase1_cache`; their user
    attributes, set by the trial), and the epochs and seconds of phase 1 they did not train."""
    reused = [t for t in trials if "phase1_reused_epochs" in t.user_attrs]
    return {
        "n_phase1_reused": len(reused),
        "phase1_saved_epochs": sum(int(t.user_attrs["phase1_reused_epochs"]) for t in reused),
        "phase1_saved_seconds": sum(float(t.user_attrs.get("phase1_saved_seconds", 0.0)) for t in reused),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OptunaSweep:
    def __init__(
        self,
        options: BloodcellOptunaSweeperConf,
        *,
        hydra_context: HydraContext,
        task_function: TaskFunction,
        config: DictConfig,
    ) -> None:
        from hydra.core.plugins import Plugins

        self.options = options
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.owner: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": uuid.uuid4().hex,
            "interval": int(options.heartbeat_interval),
        }
        self.objective_name = str(config.get("objective") or "objective")
        self.in_flight: dict[int, Claimed] = {}  # by trial id
        self.mlflow: _ParentRun | None = None
        self.failures_in_a_row = 0
        self.last_error = ""

    # ------------------------------------------------------------------ set-up
    def run(self, arguments: list[str]) -> list[list[JobReturn]]:
        try:
            self._prepare(arguments)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # as written (a ${oc.env:...} stays a reference), passwords written out in a URL masked
        saved = mask_secrets(OmegaConf.to_container(self.config, resolve=False))
        OmegaConf.save(OmegaConf.create(saved), sweep_dir / "multirun.yaml")
        self.sweep_dir = sweep_dir

        returns: list[list[JobReturn]] = []
        status = "FINISHED"
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop,), daemon=True, name="optuna-heartbeat")
        beat.start()
        previous_term = _raise_on_sigterm()
        try:
            while True:
                batch = self._claim_batch()
                if not batch:
                    break
                returns.append(self._run_batch(batch))
                limit = self.options.max_consecutive_failures
                if limit and self.failures_in_a_row >= limit:
                    status = "FAILED"
                    break
        except BaseException:
            status = "KILLED"
            raise
        finally:
            stop.set()
            for claimed in list(self.in_flight.values()):
                self._interrupt(claimed.id, claimed.trial.number, "the sweep process was stopped")
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
            self._finish(status)
        if status == "FAILED":
            print(
                f"error: the last {self.failures_in_a_row} trials failed, so the sweep stopped (last error: "
                f"{self.last_error}); fix it and rerun the same command to resume the study, or raise "
                "hydra.sweeper.max_consecutive_failures",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)
        return returns

    def _prepare(self, arguments: list[str]) -> None:
        opts = self.options
        if opts.direction not in ("maximize", "minimize"):
            raise UserError(f"direction '{opts.direction}' is neither maximize nor minimize")
        if int(opts.n_trials) < 1 or int(opts.n_jobs) < 1:
            raise UserError("n_trials and n_jobs must be at least 1")
        if int(opts.repeats) < 1:
            raise UserError(
                f"hydra.sweeper.repeats={opts.repeats}: train each point at least once (1 = no repeats)"
            )
        folds = OmegaConf.select(self.config, "data.cv.folds", default=None)
        if int(opts.repeats) > 1 and isinstance(folds, int) and folds > 1:  # else every trial fails so
            raise UserError(
                f"hydra.sweeper.repeats={opts.repeats} with data.cv.folds={folds}: choose one (the folds "
                "already train each point several times, on different validation images)"
            )
        space_args = [f"{key}={value}" for key, value in (opts.params or {}).items()] + list(arguments)
        self.space = parse_search_space(space_args)
        if not self.space.distributions:
            raise UserError(
                "nothing to search: give hydra.sweeper.params (a sweeps/ file) or a sweep "
                "override such as 'finetune.lr=tag(log, interval(1e-5, 1e-3))'"
            )
        self._check_composes()
        self.n_trials = int(opts.n_trials)
        self._make_sampler()  # fails on bad settings before the storage is touched
        pruner_name = str(opts.pruner.name or "none").lower()
        self.pruner_spec: dict[str, Any] = {
            "name": pruner_name,
            "kwargs": dict(getattr(opts.pruner, pruner_name, None) or {}),
        }
        pruner = make_pruner(self.pruner_spec)
        self.storage_url = resolve_storage_url(opts.storage)
        as_written = OmegaConf.to_container(self.config.hydra.sweeper, resolve=False)  # ${oc.env:...} kept
        written = as_written.get("storage") if isinstance(as_written, dict) else None
        if isinstance(written, str) and has_secret(written):
            log.warning(
                "hydra.sweeper.storage holds a password in plain text; Hydra saves it in every trial's "
                ".hydra/hydra.yaml: pass it as 'hydra.sweeper.storage=${oc.env:VARIABLE}' instead"
            )
        self.storage = open_storage(self.storage_url)
        choices = self.config.hydra.runtime.choices
        self.study_name = str(opts.study_name or choices.get("sweeps") or self.config.hydra.job.name)
        try:
            with self._lock():
                self.study = optuna.create_study(
                    study_name=self.study_name,
                    storage=self.storage,
                    pruner=pruner,
                    direction=optuna.study.StudyDirection[opts.direction.upper()],
                    load_if_exists=True,
                )
                # The n-th sweep process of a study seeds its sampler with seed + n: a resumed or parallel
                # sweep must not draw the same points again, and a fresh one stays reproducible.
                # Study has no system attributes of its own (gone in Optuna 5): the storage's methods,
                # public on the storage this process opened, keep them
                self.study_id = self.storage.get_study_id_from_name(self.study_name)
                attrs = self.storage.get_study_system_attrs(self.study_id)
                self.run_index = int(attrs.get(RUNS_ATTR, 0))
                self.storage.set_study_system_attr(self.study_id, RUNS_ATTR, self.run_index + 1)
        except ValueError as err:  # e.g. the stored study optimizes the other way
            raise UserError(f"study '{self.study_name}' in {redact(self.storage_url)}: {err}") from None
        self.study.sampler = self._make_sampler(seed_offset=self.run_index)
        self.rerun_prefix = self._rerun_prefix()
        if "tracking" in self.config:
            with self._lock():
                self.mlflow = _ParentRun.open(self)
        trials = self.study.get_trials(deepcopy=False)
        seed = opts.sampler.seed
        log.info(
            "study '%s' in %s: %s %s, sampler %s%s, pruner %s; %d of %d trials exist",
            self.study_name,
            redact(self.storage_url),
            opts.direction,
            self.objective_name,
            self.sampler_name,
            "" if seed is None else f" (seed {int(seed) + self.run_index})",
            self.pruner_spec["name"],
            sum(map(counts_toward_total, trials)),
            self.n_trials,
        )
        for name, written in self.space.written.items():
            log.info("  %s: %s", name, written)

    def _check_composes(self) -> None:
        """Compose one job per categorical choice (and one with every range's low end) now, so that a
        misspelt key or group fails before any trial, with one line."""
        loader = self.hydra_context.config_loader
        base = {name: _representative(dist) for name, dist in self.space.distributions.items()}
        variants = [base]
        for name, dist in self.space.distributions.items():
            for choice in getattr(dist, "choices", ())[1:]:
                variants.append({**base, name: choice})
        for params in variants:
            overrides = self.space.overrides_for(params)
            try:
                loader.load_sweep_config(master_config=self.config, sweep_overrides=overrides)
            except Exception as err:  # Hydra's composition errors
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise UserError(f"the sweep's overrides do not compose ({first})") from None

    def _make_sampler(self, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
        spec = self.options.sampler
        name = self.sampler_name = str(spec.name or "tpe").lower()
        kwargs = dict(getattr(spec, name, None) or {})
        if spec.seed is not None:
            kwargs["seed"] = int(spec.seed) + seed_offset
        if name != "grid":
            return make_sampler(name, kwargs)
        grid = grid_of(self.space)
        size = math.prod(len(v) for v in grid.values())
        if size < self.n_trials:
            if seed_offset == 0:
                log.info("the grid has %d points: n_trials %d -> %d", size, self.n_trials, size)
            self.n_trials = size
        return make_sampler(name, kwargs, grid)

    def _rerun_prefix(self) -> list[str]:
        """Fixed overrides that re-run a trial without the sweep: the sweeps file's experiment (as
        +experiment=...) and the command line's own overrides, less +sweeps=..."""
        keys = [_override_key(arg) for arg in self.space.fixed]
        kept = [mask_text(arg) for arg, key in zip(self.space.fixed, keys) if key != "sweeps"]  # a record
        experiment = self.config.hydra.runtime.choices.get("experiment")
        if "sweeps" in keys and experiment and "experiment" not in keys:
            kept.insert(0, f"+experiment={experiment}")
        return kept

    # ------------------------------------------------------------------ taking trials
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        path = lock_path(getattr(self, "storage_url", "") or "")
        if path is None:
            yield
            return
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _claim_batch(self) -> list[Claimed]:
        batch = []
        for _ in range(int(self.options.n_jobs)):
            claimed = self._claim()
            if claimed is None:
                break
            batch.append(claimed)
        return batch

    def _claim(self) -> Claimed | None:
        storage = self.storage
        with self._lock():
            self._recover_interrupted()
            if sum(map(counts_toward_total, self.study.get_trials(deepcopy=False))) >= self.n_trials:
                return None
            trial = self.study.ask(fixed_distributions=self.space.distributions)
            claimed = Claimed(self._trial_id(trial.number), trial)
            # system attributes: Trial.set_system_attr is gone in Optuna 5, the storage's method is public
            storage.set_trial_system_attr(claimed.id, OWNER_ATTR, self.owner)
            storage.set_trial_system_attr(claimed.id, HEARTBEAT_ATTR, time.time())
            self.in_flight[claimed.id] = claimed
        # Processes on other machines share no lock: the trial's rank among the counted ones decides
        # (numbers follow the order trials were created in, as Optuna numbers them under a lock of the study).
        ahead = [
            t
            for t in self.study.get_trials(deepcopy=False)
            if t.number < trial.number and counts_toward_total(t)
        ]
        if len(ahead) >= self.n_trials:
            del self.in_flight[claimed.id]
            # back into Optuna's queue (what study.enqueue_trial makes, for the next ask): no Study or Trial
            # method sets a trial WAITING; the storage's method does
            storage.set_trial_state_values(claimed.id, TrialState.WAITING)
            return None
        storage.set_trial_system_attr(claimed.id, PRUNER_ATTR, self.pruner_spec)
        trial.set_user_attr(
            "overrides", self.rerun_prefix + self.space.overrides_for(trial.params)[len(self.space.fixed) :]
        )
        return claimed

    def _trial_id(self, number: int) -> int:
        """The storage id of trial ``number`` of the study (unique: Optuna numbers a study's trials under a
        lock of the study)."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def _recover_interrupted(self) -> None:
        now = time.time()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.system_attrs.get(OWNER_ATTR)
            if not owner or owner.get("token") == self.owner["token"]:
                continue
            beat = float(t.system_attrs.get(HEARTBEAT_ATTR, 0.0))
            if owner.get("host") == self.owner["host"]:
                # on this host the process table is the truth: a live owner keeps its trial however late
                # its heartbeats are (a loaded machine delays them; judging it interrupted ran a trial twice)
                gone, silent = not _pid_alive(int(owner.get("pid", -1))), False
            else:
                gone = False
                silent = now - beat > STALE_AFTER_BEATS * int(owner.get("interval", self.owner["interval"]))
            if gone or silent:
                why = "its sweep process is gone" if gone else "its sweep process stopped sending heartbeats"
                self._interrupt(self._trial_id(t.number), t.number, why)

    def _interrupt(self, trial_id: int, number: int, why: str) -> None:
        """A trial that did not end by itself goes back into the study's queue (WAITING) with its parameters
        and its pruning reports: the next ask takes it again, and its training resumes from its last
        checkpoint in its own MLflow run (bloodcell.training.resume), so it counts once toward n_trials. After
        ``MAX_INTERRUPTIONS`` it is marked FAIL + interrupted (not counted; a new trial runs instead)."""
        try:
            interruptions = int(self.storage.get_trial(trial_id).user_attrs.get("interruptions", 0)) + 1
            # the trial may be another process's: no Trial object here, so the storage's method
            self.storage.set_trial_user_attr(trial_id, "interruptions", interruptions)
            if interruptions > MAX_INTERRUPTIONS:
                self.storage.set_trial_user_attr(trial_id, "interrupted", why)
                self._end(number, TrialState.FAIL)
            else:
                # no Study or Trial method sets a trial WAITING; the storage's method does
                self.storage.set_trial_state_values(trial_id, TrialState.WAITING)
        except (RuntimeError, ValueError):  # UpdateFinishedTrialError, or tell's "Cannot tell a FAIL trial"
            return  # ended meanwhile, or another process marked it first
        finally:
            self.in_flight.pop(trial_id, None)
        if interruptions > MAX_INTERRUPTIONS:
            log.warning("trial %d interrupted (%s) %d times: marked FAIL, its place will be run again",
                        number, why, interruptions)  # fmt: skip
        else:
            log.warning(
                "trial %d interrupted (%s): back in the queue, it resumes from its checkpoint", number, why
            )
        if self.mlflow is not None:
            self.mlflow.fail_child(number, f"interrupted: {why}")

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.owner["interval"]):
            for trial_id in list(self.in_flight):
                with contextlib.suppress(Exception):  # a system attribute: the storage's method, as in _claim
                    self.storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    # ------------------------------------------------------------------ running trials
    def _trial_overrides(self, claimed: Claimed) -> list[str]:
        trial = claimed.trial
        extra = [
            _forward_secret(f"++trial.storage={_quote(self.storage_url)}"),
            f"++trial.study_name={_quote(self.study_name)}",
            f"++trial.trial_id={claimed.id}",
            f"++trial.number={trial.number}",
        ]
        if int(self.options.repeats) > 1:  # the trial's job trains them in turn (bloodcell.training.repeats)
            extra.append(f"++trial.repeats={int(self.options.repeats)}")
        if self.mlflow is not None:
            # a name per trial: runs named at random would all be alike (train seeds `random`)
            extra[:0] = [
                f"++tracking.parent_run_id={self.mlflow.run_id}",
                f"++tracking.run_name={_quote(f'{self.study_name}-trial-{trial.number}')}",
            ]
        return [_forward_secret(arg) for arg in self.space.overrides_for(trial.params)] + extra

    def _run_batch(self, batch: list[Claimed]) -> list[JobReturn]:
        overrides = [self._trial_overrides(claimed) for claimed in batch]
        started = time.monotonic()
        returns = list(self.launcher.launch(overrides, initial_job_idx=batch[0].trial.number))
        elapsed = time.monotonic() - started
        for claimed, ret in zip(batch, returns):
            self._tell(claimed, ret, elapsed)
        self._log_summary()
        return returns

    def _end(self, trial: optuna.trial.Trial | int, state: TrialState, value: float | None = None) -> None:
        """study.tell, less GridSampler's request to stop once the grid is covered (study.stop works only
        inside study.optimize; the trial is told all the same)."""
        try:
            self.study.tell(trial, value, state=state)
        except RuntimeError as err:
            if "Study.stop" not in str(err):
                raise

    def _tell(self, claimed: Claimed, ret: JobReturn, elapsed: float) -> None:
        trial = claimed.trial
        state, value, error = TrialState.COMPLETE, None, None
        try:
            value = float(ret.return_value)
            if not math.isfinite(value):
                raise ValueError(f"the objective is {value}")
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except Exception as err:  # the trial's own exception, re-raised by JobReturn.return_value
            state, error = TrialState.FAIL, mask_text(f"{type(err).__name__}: {err}".strip())
            log.debug("trial %d failed", trial.number, exc_info=err)
        if error is not None:
            with contextlib.suppress(Exception):
                trial.set_user_attr("error", error[:2000])
        if self.mlflow is not None:  # before the trial ends: an ended trial's attributes are read-only
            self.mlflow.link(claimed)
        try:
            self._end(trial, state, value if state == TrialState.COMPLETE else None)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            # another process judged it interrupted meanwhile and put it back in the queue: the job did end,
            # so its outcome stands unless someone took the trial again already (or gave it up: FAIL)
            with contextlib.suppress(
                optuna.exceptions.UpdateFinishedTrialError, ValueError
            ):  # ended: it stays
                if self.storage.set_trial_state_values(claimed.id, TrialState.RUNNING):  # only from WAITING
                    self._end(trial, state, value if state == TrialState.COMPLETE else None)
        finally:
            self.in_flight.pop(claimed.id, None)
        if state == TrialState.FAIL:
            self.failures_in_a_row += 1
            self.last_error = (error or "").splitlines()[0][:300] if error else ""
        else:
            self.failures_in_a_row = 0
        frozen = self.storage.get_trial(claimed.id)  # as stored now (Study has no lookup by id)
        params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        if state == TrialState.COMPLETE:
            outcome = f"{self.objective_name}={value:.4f}"
        elif state == TrialState.PRUNED:
            last = frozen.last_step
            outcome = f"at step {last}" if last is not None else ""
        else:
            outcome = (error or "").splitlines()[0][:300]
        log.info(
            "trial %d %s %s | %s | %s", trial.number, frozen.state.name, outcome, params, _duration(elapsed)
        )
        if state == TrialState.FAIL and self.mlflow is not None:
            self.mlflow.fail_child(trial.number, error or "failed", only_if_missing=True)

    def _log_summary(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        c = summary_counts(trials)
        done = c["complete"] + c["pruned"] + c["failed"]
        best = self._best(trials)
        best_text = (
            f"best {self.objective_name}={best.value:.4f} (trial {best.number})"
            if best is not None
            else "no complete trial yet"
        )
        saved = phase1_savings(trials)
        if saved["n_phase1_reused"]:
            n, epochs = int(saved["n_phase1_reused"]), int(saved["phase1_saved_epochs"])
            best_text += (
                f"; phase 1 reused by {n} trial{'s' if n != 1 else ''} ({epochs} epochs, "
                f"{_duration(saved['phase1_saved_seconds'])} not trained)"
            )
        log.info(
            "study '%s': %d/%d trials done (%d complete, %d pruned, %d failed%s); %s",
            self.study_name,
            done,
            self.n_trials,
            c["complete"],
            c["pruned"],
            c["failed"],
            f", {c['running']} running" if c["running"] else "",
            best_text,
        )

    def _best(self, trials: list[FrozenTrial]) -> FrozenTrial | None:
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            return None
        pick = max if self.options.direction == "maximize" else min
        return pick(complete, key=lambda t: cast(float, t.value))  # a complete trial has its value

    def _finish(self, status: str) -> None:
        if not hasattr(self, "study"):
            return
        trials = self.study.get_trials(deepcopy=False)
        if self.mlflow is not None:
            try:
                from ._report import write_report

                files = write_report(self, trials, self._best(trials), self.sweep_dir)
                self.mlflow.finish(trials, self._best(trials), files, status)
            except Exception as err:  # the trials are safe in storage; say what the report missed
                log.warning("could not finish the MLflow parent run: %s", err, exc_info=True)
        best = self._best(trials)
        if best is not None:
            log.info(
                "best trial %d: %s=%.4f; re-run it with: python -m bloodcell.train %s",
                best.number,
                self.objective_name,
                best.value,
                " ".join(best.user_attrs.get("overrides", [])),
            )


class _ParentRun:
    """The sweep's MLflow parent run (kept as a study user attribute, so a resumed or parallel sweep of
    the study logs to the same run); trials nest under it from train's ``tracking.parent_run_id``."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str) -> None:
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    @classmethod
    def open(cls, sweep: OptunaSweep) -> _ParentRun:
        import mlflow
        from mlflow.tracking import MlflowClient

        from bloodcell.tracking import setup_experiment

        experiment_id = setup_experiment(sweep.config.tracking)
        client = MlflowClient(mlflow.get_tracking_uri())
        attrs = sweep.study.user_attrs
        run_id = attrs.get(PARENT_RUN_ATTR)
        if run_id:
            try:
                run = client.get_run(run_id)
                if run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active":
                    client.update_run(run_id, status="RUNNING")
                    log.info("MLflow: logging to the parent run %s of study '%s'", run_id, sweep.study_name)
                    parent = cls(client, run_id, experiment_id)
                    parent._set_tags(sweep)
                    return parent
            except Exception as err:  # gone, or another tracking store: start a new parent run
                log.info(
                    "MLflow: parent run %s of the study is not usable here (%s); starting a new one",
                    run_id,
                    err,
                )
        opts = sweep.options
        run = client.create_run(
            experiment_id,
            run_name=f"sweep-{sweep.study_name}",
            tags={"bloodcell.sweep": "true", "optuna.study_name": sweep.study_name},
        )
        params = {
            "study_name": sweep.study_name,
            "direction": opts.direction,
            "sampler": sweep.sampler_name,
            "pruner": sweep.pruner_spec["name"],
            "storage": redact(sweep.storage_url),
            "objective": sweep.objective_name,
            "repeats": int(opts.repeats),
        }
        params.update({f"space.{k}": v for k, v in sweep.space.written.items()})
        record_to(run.info.run_id, params=params)
        run_id = cls._one_parent(client, experiment_id, sweep.study_name, run.info.run_id)
        sweep.study.set_user_attr(PARENT_RUN_ATTR, run_id)
        log.info("MLflow: parent run %s (experiment %s)", run_id, sweep.config.tracking.experiment)
        parent = cls(client, run_id, experiment_id)
        parent._set_tags(sweep)
        return parent

    @staticmethod
    def _one_parent(client: MlflowClient, experiment_id: str, study_name: str, mine: str) -> str:
        """Sweeps of one study that start at the same moment on a database storage (no file lock between
        machines) may each create a parent run: all of them keep the earliest, and the others' go."""
        runs = client.search_runs(
            [experiment_id],
            f"tags.`bloodcell.sweep` = 'true' and tags.`optuna.study_name` = '{study_name}'",
            max_results=1000,
        )
        earliest = min(runs, key=lambda r: (r.info.start_time, r.info.run_id), default=None)
        if earliest is None or earliest.info.run_id == mine:
            return mine
        client.delete_run(mine)
        return earliest.info.run_id

    def _set_tags(self, sweep: OptunaSweep) -> None:
        opts = sweep.options
        tags = {
            "n_trials": sweep.n_trials,
            "n_jobs": opts.n_jobs,
            "sampler.config": json.dumps(
                {
                    "name": sweep.sampler_name,
                    "seed": opts.sampler.seed,
                    **(getattr(opts.sampler, sweep.sampler_name, None) or {}),
                },
                sort_keys=True,
            ),
            "pruner.config": json.dumps(sweep.pruner_spec, sort_keys=True),
            "search_space": " ".join(f"{k}={v}" for k, v in sweep.space.written.items()),
            "fixed_overrides": " ".join(sweep.rerun_prefix),
            # what the sweep ran with, as its trials record it: re-running a study needs its environment
            "bloodcell_version": __version__,
            **git_tags(),
            **version_tags(),
        }
        record_to(self.run_id, tags=tags)

    def children(self, number: int | None = None) -> list:
        query = f"tags.mlflow.parentRunId = '{self.run_id}'"
        if number is not None:
            query += f" and tags.trial_number = '{number}'"
        return self.client.search_runs([self.experiment_id], filter_string=query, max_results=5000)

    def link(self, claimed: Claimed) -> None:
        """The trial's MLflow run as its user attributes ``mlflow_run_id`` and ``mlflow_run_url`` (shown by
        optuna-dashboard): from a trial to its run; the run's tags ``optuna_study`` and ``trial_number``
        lead back. A trial that failed before its run started has none."""
        from bloodcell.tracking import ui_url

        try:
            runs = self.children(claimed.trial.number)
            # a study's trial numbers are unique; the storage id tells apart trials of another study
            # that logged under this parent run (a study renamed between sweeps)
            same = [r for r in runs if r.data.tags.get("optuna_trial_id") == str(claimed.id)] or runs
            if same:
                run = same[0].info
                claimed.trial.set_user_attr("mlflow_run_id", run.run_id)
                claimed.trial.set_user_attr("mlflow_run_url", ui_url(run.experiment_id, run.run_id))
        except Exception as err:  # a missing link must not stop the sweep
            log.warning("MLflow: could not link trial %d to its run: %s", claimed.trial.number, err)

    def fail_child(self, number: int, reason: str, only_if_missing: bool = False) -> None:
        """Mark trial ``number``'s child run FAILED (a killed sweep left it RUNNING); create one when the
        trial failed before train started its run, so that every trial has its child run."""
        try:
            runs = self.children(number)
            if not runs:
                run = self.client.create_run(
                    self.experiment_id,
                    run_name=f"trial-{number}",
                    tags={"mlflow.parentRunId": self.run_id, "trial_number": str(number)},
                )
                runs = [run]
            elif only_if_missing:
                return
            for run in runs:
                if run.info.status in ("RUNNING", "SCHEDULED") or run.info.run_id == runs[0].info.run_id:
                    ended = run.info.status in ("RUNNING", "SCHEDULED")
                    tags = {"optuna.trial_state": "FAIL", "error": reason}
                    record_to(run.info.run_id, tags=tags, status="FAILED" if ended else None)
        except Exception as err:
            log.warning("MLflow: could not mark trial %d's run failed: %s", number, err)

    def finish(
        self, trials: list[FrozenTrial], best: FrozenTrial | None, files: list[Path], status: str
    ) -> None:
        counts = summary_counts(trials)
        metrics: dict[str, float] = {f"n_{k}": v for k, v in counts.items()} | phase1_savings(trials)
        tags: dict[str, str] = {}
        if best is not None:
            metrics["best_value"] = cast(float, best.value)  # the best trial is a complete one
            metrics["best_trial_number"] = best.number
            tags["best_trial_number"] = str(best.number)
            for key, value in best.params.items():
                tags[f"best.{key}"] = str(value)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics[f"best.{key}"] = float(value)
        artifacts = [(path, "plots" if path.suffix == ".png" else None) for path in files]
        record_to(
            self.run_id, tags=tags, metrics=metrics, step=len(trials), artifacts=artifacts, status=status
        )


def _raise_on_sigterm() -> Any:  # the previous handler (signal.signal's type), None off the main thread
    """SIGTERM (a scheduler's time limit, kill) ends the sweep like Ctrl-C: running trials are marked
    interrupted, so that the next run of the study re-runs them."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def _representative(dist: Any) -> Any:
    if hasattr(dist, "choices"):
        return dist.choices[0]
    return dist.low


def _override_key(argument: str) -> str:
    key = argument.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]


def _forward_secret(override: str) -> str:
    """An override whose value holds a password (``tracking.uri=postgresql://u:pw@db/x``, the storage URL)
    as a reference to an environment variable holding the value (``tracking.uri=${oc.env:BLOODCELL_
    SECRET_...}``), set here for the trials to inherit (launched processes and SLURM jobs get the
    sweep's environment): the value then appears in no console line, override list or saved config."""
    key, sep, value = override.partition("=")
    if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":  # a quoted value: its content
        value = value[1:-1].replace("\\'", "'").replace("\\\\", "\\")
    if not sep or not has_secret(value):
        return override
    name = "BLOODCELL_SECRET_" + "".join(c if c.isalnum() else "_" for c in key.lstrip("+~")).upper()
    os.environ[name] = value
    return f"{key}=${{oc.env:{name}}}"


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
