"""A preempted SLURM job must not lose its trial to its own requeue.

Inside a job of Hydra's submitit launcher, submitit answers the preemption signal (USR2) by checkpointing
the call and running ``scontrol requeue <own job>``. That requeue makes SLURM send SIGTERM to every
process of the job, ``scontrol`` included. When the signal reaches ``scontrol`` before it exits,
submitit sees ``CalledProcessError: ... died with <Signals.SIGTERM: 15>``, writes it as the job's result
and the sweeper records the trial as failed, although SLURM has queued the job again. It is a race: it
did not show in 17 requeues and preemptions by hand on the local cluster, some under load, and failed a
CI run once.

submitit ignores SIGTERM with a Python handler, which a child process does not inherit. An ignored signal
(SIG_IGN) is inherited across exec, so SIGTERM is ignored, at the OS level, while submitit's handler runs:
``scontrol`` then finishes its request, and SLURM's SIGKILL after KillWait still ends the job.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

#: submitit's handler for the preemption / time-limit signal (submitit.core.job_environment.SignalHandler)
_SUBMITIT_REQUEUE = "checkpoint_and_try_requeue"


def shield_requeue_from_sigterm() -> None:
    """Wrap submitit's requeue handler, where one is installed in this process (a submitit job's main
    thread); elsewhere do nothing."""
    job_environment = sys.modules.get("submitit.core.job_environment")
    if job_environment is None or threading.current_thread() is not threading.main_thread():
        return  # not a submitit job, or a thread that may not set handlers (signal.signal would raise)
    for signum in signal.valid_signals():  # USR2 unless SUBMITIT_PREEMPT_SIGNAL names another
        handler = signal.getsignal(signum)
        owner = getattr(handler, "__self__", None)
        is_submitit = isinstance(owner, job_environment.SignalHandler)
        if is_submitit and getattr(handler, "__name__", "") == _SUBMITIT_REQUEUE:
            signal.signal(signum, _ignoring_sigterm(handler))


def _ignoring_sigterm(handler: Any) -> Any:
    def requeue(signum: int, frame: FrameType | None) -> None:
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            handler(signum, frame)  # ends with sys.exit after a requeue
        finally:
            signal.signal(signal.SIGTERM, previous)

    return requeue  # not submitit's bound method any more: a second call leaves it as it is
