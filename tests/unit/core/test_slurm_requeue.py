"""A submitit job's requeue survives the SIGTERM its own requeue brings (bloodcell.core.slurm_requeue).

The race is provoked on purpose: submitit's real SignalHandler, with a job environment whose requeue
command is killed by SIGTERM while it runs, as SLURM kills every process of a job it requeues."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("submitit", reason="pip install submitit (the cluster extra)")

JOB = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    from submitit.core import job_environment

    class Requeued(Exception):
        pass

    class Slurm(job_environment.JobEnvironment):
        # SlurmJobEnvironment._requeue runs `scontrol requeue`; here the command gets SLURM's SIGTERM
        def _requeue(self, countdown):
            subprocess.check_call(["sh", "-c", "kill -TERM $$; echo requeued"], timeout=60)

    class Handler(job_environment.SignalHandler):
        def checkpoint_and_try_requeue(self, signum, frame=None):
            self.env._requeue(1)
            raise Requeued  # submitit exits here (sys.exit); an exception tells the test apart

    handler = Handler.__new__(Handler)
    handler.env = Slurm.__new__(Slurm)
    signal.signal(signal.SIGTERM, handler.bypass)
    signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)

    def trial():
        os.kill(os.getpid(), signal.SIGUSR2)  # SLURM preempts the job

    try:
        if sys.argv[1] == "shielded":
            from bloodcell.core.cli import run_or_exit

            run_or_exit(trial)
        else:
            trial()
    except Requeued:
        assert signal.getsignal(signal.SIGTERM) == handler.bypass  # submitit's own handler again
        print("requeued, not failed")
    """
)


def _job(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", JOB, mode], capture_output=True, text=True, timeout=120)


def test_requeue_command_survives_the_sigterm_of_its_own_requeue():
    done = _job("shielded")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["requeued", "requeued,", "not", "failed"], done.stdout


def test_without_the_shield_the_same_requeue_fails_as_it_did_in_ci():
    done = _job("bare")
    assert done.returncode != 0
    assert "died with <Signals.SIGTERM: 15>" in done.stderr, done.stderr
