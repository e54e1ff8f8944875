"""The sweep loop: ask Optuna for a batch of trials, launch them through Hydra's launcher, tell Optuna
how each ended, and keep the study's MLflow parent run up to date.

One class, ``OptunaSweep``: set-up (options checked, the study and its sampler and pruner, the parent run)
and the ask-launch-tell loop. Taking trials, heartbeats and giving back the trials of a dead sweep process
are in ``_claims``; the parent run in ``_parent_run``; the report a sweep leaves behind in ``_report``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, cast

import optuna
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from bloodcell.core.errors import UserError
from bloodcell.core.redaction import has_secret, mask_secrets, mask_text
from bloodcell.core.settings import warn_plain_secrets
from bloodcell.sweep.tables import make_pruner, make_sampler
from bloodcell.sweep.trial import open_storage, redact, resolve_storage_url

from ._claims import (
    Claimed,
    claim,
    counts_toward_total,
    end_trial,
    interrupt,
    new_owner,
    send_heartbeats,
    storage_lock,
)
from ._parent_run import ParentRun, fail_child, finish, link, open_parent_run, phase1_savings, summary_counts
from ._search_space import grid_of, parse_search_space
from .config import BloodcellOptunaSweeperConf

log = logging.getLogger(__name__)

RUNS_ATTR = "bloodcell:sweep_runs"


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
        self.owner = new_owner(options.heartbeat_interval)
        self.objective_name = str(config.get("objective") or "objective")
        self.in_flight: dict[int, Claimed] = {}  # by trial id
        self.mlflow: ParentRun | None = None
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
        beat = threading.Thread(
            target=send_heartbeats, args=(self, stop), daemon=True, name="optuna-heartbeat"
        )
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
                interrupt(self, claimed.id, claimed.trial.number, "the sweep process was stopped")
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
        # once, here: the trials get every such value as an ${oc.env:...} reference (_forward_secret)
        as_written = cast(dict, OmegaConf.to_container(self.config, resolve=False))  # ${oc.env:...} kept
        storage_written = as_written["hydra"]["sweeper"].get("storage")
        task_written = {key: value for key, value in as_written.items() if key != "hydra"}
        warn_plain_secrets({"hydra.sweeper.storage": storage_written, **task_written})
        self.storage = open_storage(self.storage_url)
        choices = self.config.hydra.runtime.choices
        self.study_name = str(opts.study_name or choices.get("sweeps") or self.config.hydra.job.name)
        try:
            with storage_lock(self.storage_url, self.storage):
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
            with storage_lock(self.storage_url, self.storage):
                self.mlflow = open_parent_run(self)
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

    # ------------------------------------------------------------------ running trials
    def _claim_batch(self) -> list[Claimed]:
        batch = []
        for _ in range(int(self.options.n_jobs)):
            claimed = claim(self)
            if claimed is None:
                break
            batch.append(claimed)
        return batch

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
        try:
            returns = list(self.launcher.launch(overrides, initial_job_idx=batch[0].trial.number))
        except Exception as err:
            # A job process was lost (SIGKILL, the OOM killer: joblib's TerminatedWorkerError breaks the
            # whole batch); a trial's own error comes back in its JobReturn instead. The batch's trials did
            # not end: back in the queue, each resumes from its checkpoint, and the sweep goes on. A lost
            # batch counts once toward max_consecutive_failures, so a launcher that always fails stops it.
            why = f"its job process was lost ({type(err).__name__})"
            for claimed in batch:
                interrupt(self, claimed.id, claimed.trial.number, why)
            self.failures_in_a_row += 1
            self.last_error = mask_text(f"{type(err).__name__}: {err}".strip()).splitlines()[0][:300]
            return []
        elapsed = time.monotonic() - started
        for claimed, ret in zip(batch, returns):
            self._tell(claimed, ret, elapsed)
        self._log_summary()
        return returns

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
            link(self.mlflow, trial, claimed.id)
        try:
            end_trial(self.study, trial, state, value if state == TrialState.COMPLETE else None)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            # another process judged it interrupted meanwhile and put it back in the queue: the job did end,
            # so its outcome stands unless someone took the trial again already (or gave it up: FAIL)
            with contextlib.suppress(
                optuna.exceptions.UpdateFinishedTrialError, ValueError
            ):  # ended: it stays
                if self.storage.set_trial_state_values(claimed.id, TrialState.RUNNING):  # only from WAITING
                    end_trial(self.study, trial, state, value if state == TrialState.COMPLETE else None)
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
            fail_child(
                self.mlflow, trial.number, error or "failed", only_if_missing=True, trial_id=claimed.id
            )

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
            "".join(f", {c[k]} {k}" for k in ("running", "waiting") if c[k]),
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
            from bloodcell.tracking.outbox import unreachable

            from ._report import write_report

            # a tracking server restarting as the sweep ends: waited for (as a run's end is), not left RUNNING
            deadline, said = time.monotonic() + 120, False
            while True:
                try:
                    files = write_report(self, trials, self._best(trials), self.sweep_dir)
                    finish(self.mlflow, trials, self._best(trials), files, status)
                    break
                except Exception as err:  # the trials are safe in storage; say what the report missed
                    if unreachable(err) and time.monotonic() < deadline:
                        if not said:
                            log.warning("tracking server unreachable; the parent run ends when it answers")
                            said = True
                        time.sleep(5)
                        continue
                    log.warning("could not finish the MLflow parent run: %s", err, exc_info=True)
                    break
        best = self._best(trials)
        if best is not None:
            log.info(
                "best trial %d: %s=%.4f; re-run it with: python -m bloodcell.train %s",
                best.number,
                self.objective_name,
                best.value,
                " ".join(best.user_attrs.get("overrides", [])),
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
