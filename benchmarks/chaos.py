"""A chaos soak of a sweep: tiny trials, 2 at a time (joblib), against a real `mlflow server` and a real
Optuna RDB storage (SQLite, or PostgreSQL with --postgres), while a seeded schedule of faults hits at
random moments, until the study has N finished trials (issue 26). Then it prints what the faults cost and
whether anything was lost, run twice or left RUNNING, and checks both stores.

    python benchmarks/chaos.py                        # N = 40 trials, seed 0, SQLite
    python benchmarks/chaos.py --seed 1 --trials 10   # another schedule, a shorter soak
    eval "$(bash scripts/ci_services.sh)" && python benchmarks/chaos.py --postgres

Faults (one drawn at a time, every 20-60 s; the same seed gives the same schedule of times, kinds,
durations and targets):

- ``trial_kill``: SIGKILL of one trial process (a joblib worker).
- ``sweep_kill``: SIGKILL of the whole sweep (its process group), then the same command again: rerunning it
  resumes the study (docs/sweeps.md).
- ``server_kill``: SIGKILL of the `mlflow server`, restarted on the same port and store 2-10 s later.
- ``trial_stall``: SIGSTOP of one trial process for 5-20 s, then SIGCONT (a stalled worker).
- ``storage_outage``: the study's database unavailable for 3-8 s: SQLite, an exclusive lock held on the file;
  PostgreSQL, new connections refused and every open one terminated (pg_terminate_backend).

Any exit of the sweep before the study is done (a fault took it down) is followed by the same command, as a
user would. The faults go on until the study has its N trials, or until --max-minutes.

What it prints: faults injected by kind; sweep restarts; trials COMPLETE / PRUNED / FAIL (a tiny trial
cannot fail by itself, so a FAIL is a trial lost to a fault, unless it was given up after repeated
interruptions and its place run anew; both listed), how often trials were restarted; MLflow child runs
per Optuna trial (must be exactly one); runs left RUNNING (must be 0); the epochs trained beyond those the
final trials kept (a checkpoint written again for an epoch of the same run is an epoch trained twice;
epochs of a trial that was given up count too; epochs cut short by a kill before their checkpoint are not
seen: a resumed trial goes on after its last checkpoint, so the faults' cost is mostly restarts); and an
integrity check of both stores: every
FINISHED trial run has its model and a metric for each epoch, every Optuna trial links to its MLflow run
(user attribute ``mlflow_run_id``) and that run back to the trial (tags ``optuna_trial_id``,
``trial_number``), with matching end states.

Everything is written under --workdir (default benchmarks/results/chaos/<storage>-seed<seed>, removed first):
the server's store, the SQLite study, the checkpoints, the sweep's folder and log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import free_port, start_mlflow_server, stop_mlflow_server  # noqa: E402

KINDS = ("trial_kill", "sweep_kill", "server_kill", "trial_stall", "storage_outage")

#: a tiny trial: demo cells at 32 px, 2 + 2 epochs (the median pruner can prune from step 3), eager steps
TRIAL = [
    "data.image_size=32",
    "data.per_class=12",
    "trainer.epochs=2",
    "finetune.epochs=2",
    "trainer.verbose=0",
    "trainer.run_eagerly=true",
    "tracking.explain=false",
    # phase 1 trained by every trial: a checkpoint per epoch is then the count of epochs trained
    "trainer.reuse_phase1=false",
]


#: the search space, given here: a study resumed with another space (sweeps/quick.yaml edited meanwhile)
#: cannot take back its own trials
SPACE = [
    "hydra.sweeper.params=null",
    "finetune.unfreeze_blocks=int(interval(0, 4))",
    "finetune.lr=tag(log, interval(1e-5, 1e-2))",
    "augmentation.strength=interval(0.0, 1.0)",
]


@dataclass
class Fault:
    at: float  # seconds after the soak started
    kind: str
    duration: float  # of the outage or stall; the wait before the server restarts
    target: float  # in [0, 1): which of the trial processes, in pid order


def schedule(seed: int, minutes: float) -> list[Fault]:
    """The faults of a soak: the same seed, the same list."""
    rng = random.Random(seed)
    faults, at = [], 0.0
    while at < minutes * 60:
        at += rng.uniform(20, 60)
        kind = rng.choice(KINDS)
        duration = {"server_kill": rng.uniform(2, 10), "trial_stall": rng.uniform(5, 20)}.get(
            kind, rng.uniform(3, 8)
        )
        faults.append(Fault(at, kind, duration, rng.random()))
    return faults


# ------------------------------------------------------------------------------------------------ storage
class SqliteStudy:
    def __init__(self, work: Path) -> None:
        self.path = work / "optuna.db"
        self.url = f"sqlite:///{self.path}"

    def outage(self, seconds: float) -> None:
        """An exclusive lock on the database file: every reader and writer waits (Optuna's SQLite engine
        waits up to 60 s for it, bloodcell.sweep.trial.open_storage)."""
        if not self.path.exists():
            time.sleep(seconds)
            return
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            connection.execute("BEGIN EXCLUSIVE")
            time.sleep(seconds)
            connection.execute("ROLLBACK")
        finally:
            connection.close()


class PostgresStudy:
    """A database of its own on the PostgreSQL server of BLOODCELL_TEST_POSTGRES (created, dropped first):
    terminating every connection of the test database would break whatever else uses it."""

    def __init__(self, seed: int) -> None:
        from urllib.parse import urlsplit, urlunsplit

        base = os.environ.get("BLOODCELL_TEST_POSTGRES")
        if not base:
            sys.exit('--postgres needs BLOODCELL_TEST_POSTGRES: eval "$(bash scripts/ci_services.sh)"')
        parts = urlsplit(base)
        self.database = f"chaos_seed{seed}"
        self.owner = parts.username or "postgres"
        self.url = urlunsplit(parts._replace(path=f"/{self.database}"))
        self._admin(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)")
        self._admin(f"CREATE DATABASE {self.database} OWNER {self.owner}")

    @staticmethod
    def _admin(sql: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", "psql", "-v", "ON_ERROR_STOP=1", "-qtAX", "-c", sql],
            check=True,
            capture_output=True,
            text=True,
        )

    def outage(self, seconds: float) -> None:
        self._admin(f"ALTER DATABASE {self.database} WITH ALLOW_CONNECTIONS false")
        try:
            self._admin(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{self.database}' AND pid <> pg_backend_pid()"
            )
            time.sleep(seconds)
        finally:
            self._admin(f"ALTER DATABASE {self.database} WITH ALLOW_CONNECTIONS true")


# ------------------------------------------------------------------------------------------------ the soak
@dataclass
class Soak:
    work: Path
    study: SqliteStudy | PostgresStudy
    trials: int
    port: int = field(default_factory=free_port)
    server: subprocess.Popen | None = None
    sweep: subprocess.Popen | None = None
    faults: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    sweep_runs: int = 0
    epoch_writes: dict = field(default_factory=dict)  # (run id, epoch folder) -> {state.json mtimes}
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bloodcell.train",
            "-m",
            "+sweeps=quick",
            *TRIAL,
            *SPACE,
            f"hydra.sweeper.n_trials={self.trials}",
            "hydra.sweeper.n_jobs=2",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweeper.storage={self.study.url}",
            "hydra.sweeper.study_name=chaos",
            f"hydra.sweep.dir={self.work / 'multirun'}",
            f"tracking.uri={self.server_url}",
            f"trainer.checkpoint.dir={self.work / 'checkpoints'}",
        ]

    def start_sweep(self) -> None:
        self.sweep_runs += 1
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
        with open(self.work / "sweep.log", "a") as log:
            log.write(f"\n===== sweep run {self.sweep_runs} at {time.strftime('%H:%M:%S')}\n")
            log.flush()
            self.sweep = subprocess.Popen(
                self.command(),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def trial_processes(self) -> list[int]:
        """The sweep's joblib workers (loky), in pid order."""
        import psutil

        if self.sweep is None or self.sweep.poll() is not None:
            return []
        try:
            children = psutil.Process(self.sweep.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        workers = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                line = " ".join(child.cmdline())
                if "loky" in line and "resource_tracker" not in line and "semaphore" not in line:
                    workers.append(child.pid)
        return sorted(workers)

    # faults --------------------------------------------------------------------------------------
    def inject(self, fault: Fault) -> None:
        kind = fault.kind
        if kind in ("trial_kill", "trial_stall"):
            workers = self.trial_processes()
            if not workers:
                self.skipped[kind] += 1  # between sweep runs, or before the first batch
                return
            pid = workers[int(fault.target * len(workers))]
            with contextlib.suppress(ProcessLookupError):
                if kind == "trial_kill":
                    os.kill(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGSTOP)
                    time.sleep(fault.duration)
                    os.kill(pid, signal.SIGCONT)
        elif kind == "sweep_kill":
            if self.sweep is None or self.sweep.poll() is not None:
                self.skipped[kind] += 1
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.sweep.pid, signal.SIGKILL)
            self.sweep.wait()
            self._kill_strays()
        elif kind == "server_kill":
            assert self.server is not None
            stop_mlflow_server(self.server)
            time.sleep(fault.duration)
            self.server = start_mlflow_server(self.work / "server", self.port)
        elif kind == "storage_outage":
            self.study.outage(fault.duration)
        self.faults[kind] += 1
        print(f"  {time.strftime('%H:%M:%S')} {kind} ({fault.duration:.0f} s)", flush=True)

    def _kill_strays(self) -> None:
        """Processes of the killed sweep that left its process group (none are expected): every process
        marked with this soak's BLOODCELL_CHAOS but the driver and the tracking server."""
        import psutil

        server_group = self.server.pid if self.server is not None else -1
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if process.pid == os.getpid() or os.getpgid(process.pid) == server_group:
                    continue
                if process.environ().get("BLOODCELL_CHAOS") == str(self.work):
                    process.kill()

    # epochs --------------------------------------------------------------------------------------
    def watch_checkpoints(self) -> None:
        """Every checkpoint written, by (run, epoch folder) and state.json's mtime: a checkpoint folder lives
        until the next epoch's replaces it, so polling faster than an epoch sees each one."""
        root = self.work / "checkpoints"
        while not self.stop.wait(0.2):
            for state in root.glob("*/epoch-*/state.json"):
                with contextlib.suppress(OSError):
                    key = (state.parent.parent.name, state.parent.name)
                    self.epoch_writes.setdefault(key, set()).add(state.stat().st_mtime_ns)

    # the loop ------------------------------------------------------------------------------------
    def run(self, faults: list[Fault], minutes: float) -> bool:
        self.server = start_mlflow_server(self.work / "server", self.port)
        watcher = threading.Thread(target=self.watch_checkpoints, daemon=True)
        watcher.start()
        started = time.monotonic()
        pending = list(faults)
        done = False
        try:
            while time.monotonic() - started < minutes * 60:
                if self.sweep is None or self.sweep.poll() is not None:
                    if self.sweep is not None and self.sweep.returncode == 0 and self.study_done():
                        done = True
                        break
                    self.start_sweep()
                if pending and time.monotonic() - started >= pending[0].at:
                    self.inject(pending.pop(0))
                time.sleep(0.5)
        finally:
            if not done and self.sweep is not None and self.sweep.poll() is None:
                print(f"--max-minutes {minutes} reached: the sweep is stopped", flush=True)
                os.killpg(self.sweep.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.sweep.wait(120)
            time.sleep(1)
            self.stop.set()
            watcher.join()
        return done

    def study_done(self) -> bool:
        from hydra_plugins.bloodcell_optuna_sweeper._claims import counts_toward_total

        study = self.load_study()
        return sum(map(counts_toward_total, study.get_trials(deepcopy=False))) >= self.trials

    def load_study(self):
        import optuna

        from bloodcell.sweep.trial import open_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.load_study(study_name="chaos", storage=open_storage(self.study.url))


# ------------------------------------------------------------------------------------------------ figures
def report(soak: Soak, done: bool, seconds: float) -> dict:
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from hydra_plugins.bloodcell_optuna_sweeper._claims import counts_toward_total

    study = soak.load_study()
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    given_up = [t.number for t in trials if t.state == TrialState.FAIL and "interrupted" in t.user_attrs]
    # a tiny trial cannot fail by itself (its config is valid): a FAIL that was not given up is a trial lost
    lost = {t.number: str(t.user_attrs.get("error", ""))[:200] for t in trials
            if t.state == TrialState.FAIL and "interrupted" not in t.user_attrs}  # fmt: skip
    restarts = sum(int(t.user_attrs.get("interruptions", 0)) for t in trials)
    counted = [t for t in trials if counts_toward_total(t)]
    unfinished = [t.number for t in trials if not t.state.is_finished()]

    client = MlflowClient(soak.server_url)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], max_results=5000) if experiment else []
    parents = [r for r in runs if r.data.tags.get("bloodcell.sweep") == "true"]
    children = [r for r in runs if "trial_number" in r.data.tags and "bloodcell.member" not in r.data.tags]
    running = [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    by_trial: dict[str, list] = {}
    for run in children:
        by_trial.setdefault(
            run.data.tags.get("optuna_trial_id", f"number {run.data.tags['trial_number']}"), []
        )
        by_trial[run.data.tags.get("optuna_trial_id", f"number {run.data.tags['trial_number']}")].append(run)
    ids = {str(t._trial_id): t for t in trials}
    runs_per_trial = Counter(len(by_trial.get(trial_id, [])) for trial_id in ids)
    duplicated = sorted(ids[i].number for i in ids if len(by_trial.get(i, [])) > 1)
    without_run = sorted(ids[i].number for i in ids if not by_trial.get(i))
    orphans = sorted(key for key in by_trial if key not in ids)

    problems: list[str] = []
    expected_status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": ("FAILED", "KILLED")}
    for trial in trials:
        trial_id = str(trial._trial_id)
        linked = trial.user_attrs.get("mlflow_run_id")
        mine = by_trial.get(trial_id, [])
        if trial.state.is_finished() and len(mine) == 1:
            run = mine[0]
            if linked != run.info.run_id:
                problems.append(f"trial {trial.number} links to run {linked}, its run is {run.info.run_id}")
            if run.data.tags.get("trial_number") != str(trial.number):
                problems.append(f"run {run.info.run_id} says trial {run.data.tags.get('trial_number')}")
            want = expected_status.get(trial.state.name, ())
            if run.info.status not in ((want,) if isinstance(want, str) else want):
                problems.append(f"trial {trial.number} {trial.state.name}, its run {run.info.status}")
    finished_runs = [r for r in children if r.info.status == "FINISHED"]
    for run in finished_runs:
        run_id = run.info.run_id
        if not run.data.tags.get("model_uri"):
            problems.append(f"run {run_id} FINISHED without tag model_uri")
        else:
            import mlflow

            mlflow.set_tracking_uri(soak.server_url)
            try:
                if not mlflow.artifacts.list_artifacts(artifact_uri=run.data.tags["model_uri"]):
                    problems.append(f"run {run_id}: its model {run.data.tags['model_uri']} is empty")
            except Exception as err:
                problems.append(f"run {run_id}: its model cannot be listed ({str(err).splitlines()[0]})")
        steps = sorted(m.step for m in client.get_metric_history(run_id, "val_accuracy"))
        if not steps or steps != list(range(len(steps))):
            problems.append(f"run {run_id}: val_accuracy at steps {steps}")
        if "test_accuracy" not in run.data.metrics:
            problems.append(f"run {run_id}: no test_accuracy")

    # epochs: a checkpoint written twice for one epoch of one run is an epoch trained twice
    writes = sum(len(mtimes) for mtimes in soak.epoch_writes.values())
    kept_runs = {r.info.run_id for r in children if r.data.tags.get("optuna_trial_id") in ids
                 and counts_toward_total(ids[r.data.tags["optuna_trial_id"]])}  # fmt: skip
    kept = sum(1 for (run_id, _epoch) in soak.epoch_writes if run_id in kept_runs)
    figures = {
        "done": done,
        "minutes": round(seconds / 60, 1),
        "sweep_runs": soak.sweep_runs,
        "faults": dict(soak.faults),
        "faults_skipped_no_target": dict(soak.skipped),
        "trials": dict(states),
        "trials_counted": len(counted),
        "trials_lost_to_an_error": lost,
        "trials_given_up_after_interruptions": given_up,
        "trial_restarts_after_interruptions": restarts,
        "trials_unfinished": unfinished,
        "child_runs_per_trial": {str(k): v for k, v in sorted(runs_per_trial.items())},
        "trials_with_two_or_more_runs": duplicated,
        "trials_without_run": without_run,
        "runs_of_no_trial": orphans,
        "runs_left_running": running,
        "parent_runs": len(parents),
        "epochs_checkpointed": writes,
        "epochs_kept": kept,
        "epochs_extra": writes - kept,
        "integrity_problems": problems,
    }
    return figures


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=40, help="finished trials the study must reach")
    parser.add_argument("--seed", type=int, default=0, help="the fault schedule's seed")
    parser.add_argument("--max-minutes", type=float, default=60, help="stop the soak after this long")
    parser.add_argument("--postgres", action="store_true", help="the study in PostgreSQL, not SQLite")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    name = f"{'postgres' if args.postgres else 'sqlite'}-seed{args.seed}"
    work = (args.workdir or ROOT / "benchmarks" / "results" / "chaos" / name).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["BLOODCELL_CHAOS"] = str(work)  # marks the soak's processes (stray workers after a kill)
    study = PostgresStudy(args.seed) if args.postgres else SqliteStudy(work)
    soak = Soak(work, study, args.trials)
    faults = schedule(args.seed, args.max_minutes)
    print(f"chaos soak {name}: {args.trials} trials, faults every 20-60 s; work dir {work}", flush=True)
    signal.signal(signal.SIGTERM, _stop)  # kill <pid>: the sweep and the server are stopped, not left
    started = time.monotonic()
    try:
        done = soak.run(faults, args.max_minutes)
        figures = report(soak, done, time.monotonic() - started)
    finally:
        if soak.server is not None:
            stop_mlflow_server(soak.server)
    (work / "figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    whole = (
        done
        and figures["trials_counted"] == args.trials
        and not figures["trials_lost_to_an_error"]
        and not figures["trials_unfinished"]
        and not figures["trials_with_two_or_more_runs"]
        and not figures["trials_without_run"]
        and not figures["runs_left_running"]
        and not figures["integrity_problems"]
    )
    print("RESULT:", "whole (nothing lost, run twice or left RUNNING)" if whole else "NOT whole", flush=True)
    return 0 if whole else 1


if __name__ == "__main__":
    sys.exit(main())
