"""The multi-node sweep recipe of docs/sweeps.md on a real SLURM cluster: every trial an `sbatch` job through
`hydra/launcher=submitit_slurm`, runs in an `mlflow server`, the study in PostgreSQL when
BLOODCELL_TEST_POSTGRES names a database (else a journal file); and a trial job that SLURM preempts or
requeues in the middle of its training resumes the same Optuna trial and the same MLflow run.

Needs a cluster whose jobs run on this machine (they share tmp_path with the test), such as the one-node
cluster of `scripts/local_slurm.sh`:
    bash scripts/local_slurm.sh --install && python -m pytest tests/test_slurm.py
Without `sbatch`, or with the cluster down, every test here is skipped.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import test_multi_node
from tests.helpers import TINY

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")

# the fixture of tests/test_multi_node.py: a real `mlflow server` on a free local port
mlflow_server = test_multi_node.mlflow_server

TRIAL = [o for o in TINY if o != "+experiment=quickstart"] + ["tracking.log_model=false"]


def _slurm_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    if not (shutil.which("sbatch") and shutil.which("scontrol") and shutil.which("sinfo")):
        return "no SLURM client (sbatch); bash scripts/local_slurm.sh --install starts a one-node cluster"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "the SLURM controller does not answer (bash scripts/local_slurm.sh starts it)"
    if ping.returncode != 0 or not re.search(r"\bis UP\b", ping.stdout):  # "Slurmctld(primary) at vm is UP"
        said = (ping.stdout.strip() or ping.stderr.strip()).splitlines()
        return f"the SLURM controller is down ({said[0] if said else 'scontrol ping failed'})"
    usable = {"idle", "mixed", "allocated", "completing"}
    if not usable & set(nodes.stdout.split()):
        return f"no SLURM node can run jobs (states: {' '.join(nodes.stdout.split()) or 'none'})"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = _slurm_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture
def job_name(slurm) -> Iterator[str]:
    """A job name of this test's own: its jobs are found by it, and cancelled by it whatever happens."""
    name = f"bloodcell-test-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["scancel", "--name", name], capture_output=True, timeout=60)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    """The sweep processes a test starts; any still running at its end (a failed test) are killed."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _storage(tmp_path: Path) -> str:
    return os.environ.get("BLOODCELL_TEST_POSTGRES") or f"journal:{tmp_path / 'optuna.journal'}"


def _sweep(
    tmp_path: Path, folder: str, job_name: str, storage: str, study: str, tracking: str, *extra: str
) -> subprocess.Popen:
    """A sweep process whose trials are SLURM jobs of one CPU each, as a user would start it."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bloodcell.train",
            "-m",
            "+sweeps=quick",
            *TRIAL,
            f"tracking.uri={tracking}",
            f"hydra.sweeper.storage={storage}",
            f"hydra.sweeper.study_name={study}",
            "hydra/launcher=submitit_slurm",
            f"hydra.launcher.name={job_name}",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2",
            "hydra.launcher.timeout_min=20",
            f"hydra.sweep.dir={tmp_path / folder}",  # submitit's folder is <sweep dir>/.submitit/<job id>
            *extra,
        ],
        cwd=tmp_path,
        # sbatch passes the environment on to the job (--export=ALL)
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen, timeout: float) -> str:
    try:
        output = process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        output = process.communicate()[0]
        pytest.fail(f"the sweep did not end within {timeout:.0f} s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    return output


def _jobs(job_name: str) -> dict[str, str]:
    """Job id -> state of this test's jobs in the queue."""
    out = subprocess.run(
        ["squeue", "-h", "--name", job_name, "-o", "%i %T"], capture_output=True, text=True, timeout=60
    ).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def _children(tracking: str, study: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    return [r for r in runs if r.info.run_name and r.info.run_name.startswith(f"{study}-trial-")]


@pytest.mark.slow
def test_two_sweeps_with_sbatch_jobs_share_one_study_and_one_mlflow_server(
    tmp_path, mlflow_server, job_name, started
):
    import optuna

    from bloodcell.sweep.trial import open_storage

    # a journal file, not BLOODCELL_TEST_POSTGRES: on PostgreSQL this test launched a fifth job for a 4-trial
    # study (1 pass, 1 extra job in 2 runs on 2026-12-02); since the sweepers share PostgreSQL's advisory
    # lock (2026-12-07) it passed 5 runs of 5 there, too few to call the cause found. The PostgreSQL study
    # of two sweeps is covered by tests/e2e/test_multi_node.py (submitit_local) meanwhile
    storage = f"journal:{tmp_path / 'optuna.journal'}"
    study_name = f"slurm-{uuid.uuid4().hex[:8]}"  # a shared database may hold earlier studies
    args = (storage, study_name, mlflow_server, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2")
    started += [_sweep(tmp_path, "a", job_name, *args), _sweep(tmp_path, "b", job_name, *args)]
    outputs = [_finish(p, timeout=1500) for p in started]

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4  # no point tried twice
    assert all(len(t.intermediate_values) >= 1 for t in study.trials)  # each job reopened its trial
    # every trial was one SLURM job, run once: submitit names a job's folder by its SLURM id (<array>_<task>)
    results = [p for sweep in "ab" for p in (tmp_path / sweep / ".submitit").glob("*/*_result.pkl")]
    assert len(results) == 4
    assert all(re.fullmatch(r"\d+(_\d+)?", p.parent.name) for p in results), results
    assert sum("Submitit 'slurm' sweep output dir" in output for output in outputs) == 2

    test_multi_node.assert_one_study_in_mlflow(mlflow_server)


def _preempt(job_id: str, job_name: str) -> None:
    """What a busy cluster does: a job of a higher-priority partition that needs every CPU of the node.
    SLURM preempts the trial's job (PreemptMode=REQUEUE in scripts/local_slurm.sh): it sends the job its
    --signal at once (submitit asks for USR2; SlurmctldParameters=preempt_send_user_signal) and requeues
    it."""
    cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0]
    subprocess.run(
        ["sbatch", "-p", "urgent", "-c", cpus, "-J", job_name, "-o", "/dev/null", "--wrap", "sleep 5"],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _requeue(job_id: str, job_name: str) -> None:
    """An administrator requeues a job whose node hangs: SLURM queues it again, which reruns the same call
    (the same trial), and the trial's process dies. Left alone, the process would train on through
    KillWait (submitit ignores SIGTERM) and, with epochs of a fraction of a second, could finish before
    SIGKILL; so it is stopped (SIGSTOP) before the requeue and killed right after it."""
    listed = subprocess.run(
        ["scontrol", "listpids", job_id], capture_output=True, text=True, timeout=60
    ).stdout
    trial_pids = []
    for pid in map(int, re.findall(r"^\s*(\d+)\s", listed, flags=re.MULTILINE)):
        with contextlib.suppress(OSError):
            if b"submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_bytes():
                trial_pids.append(pid)
    assert trial_pids, f"no submitit process among the job's pids:\n{listed}"
    for pid in trial_pids:
        os.kill(pid, signal.SIGSTOP)
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, timeout=60)
    for pid in trial_pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("interrupt", "epochs"),
    # 1 epoch in phase 1, the rest in phase 2, none cut short by early stopping
    [(_preempt, 5), (_requeue, 5)],
    ids=["preempted", "requeued"],
)
def test_a_trial_job_interrupted_in_phase_2_resumes_its_trial_and_its_run(
    tmp_path, mlflow_server, job_name, started, interrupt, epochs
):
    import optuna

    from bloodcell.sweep.trial import open_storage

    storage = _storage(tmp_path)
    study_name = f"slurm-requeue-{uuid.uuid4().hex[:8]}"
    sweep = _sweep(
        tmp_path,
        "sweep",
        job_name,
        storage,
        study_name,
        mlflow_server,
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.pruner.name=none",
        "finetune.unfreeze_blocks=choice(4)",  # a phase 2 for every trial (0 would skip it)
        f"finetune.epochs={epochs - 1}",
        "finetune.early_stopping_patience=100",
    )
    started.append(sweep)
    # wait until the trial's job is running and has reported its first phase-2 epoch to Optuna
    deadline = time.monotonic() + 600
    optuna_storage = None
    while True:
        assert sweep.poll() is None, sweep.communicate()[0][-4000:]
        assert time.monotonic() < deadline, f"no job reached phase 2 in time (queue: {_jobs(job_name)})"
        running = [job for job, state in _jobs(job_name).items() if state == "RUNNING"]
        if running:  # the sweep made the study before it submitted the job
            optuna_storage = optuna_storage or open_storage(storage)
            study = optuna.load_study(study_name=study_name, storage=optuna_storage)
            if study.trials and max(study.trials[0].intermediate_values, default=-1) >= 1:
                break
        time.sleep(0.3)
    job_id = running[0]
    interrupt(job_id, job_name)
    output = _finish(sweep, timeout=900)

    # SLURM ran the job twice
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in shown, shown
    job_log = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit" / job_id).glob("*_log.*"))

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    [trial] = study.trials
    assert trial.state.name == "COMPLETE", output[-3000:]
    assert sorted(trial.intermediate_values) == list(range(epochs))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    [child] = _children(mlflow_server, study_name)  # the requeued job went on in the same run
    assert child.info.status == "FINISHED"
    assert child.data.tags["trial_number"] == "0"
    assert child.data.tags.get("resumed") == "1", job_log[-3000:]
    for metric in ("val_accuracy", "train_loss", "learning_rate"):
        steps = [m.step for m in client.get_metric_history(child.info.run_id, metric)]
        assert sorted(steps) == list(range(epochs)), (metric, steps)  # each epoch once
