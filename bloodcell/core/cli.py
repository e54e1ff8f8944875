"""What every entry point (train, clean, promote, predict, submit, ...) shares: turning a UserError
into one line on stderr and exit status 2, instead of a traceback; ending the process once its work is
done (`exit_now`); and, for scripts and notebooks, the config an entry point would compose."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from bloodcell.core.errors import UserError
from bloodcell.core.slurm_requeue import shield_requeue_from_sigterm

if TYPE_CHECKING:
    from omegaconf import DictConfig

T = TypeVar("T")


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # outside Hydra
        return False


def run_or_exit(task: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``task``; on a UserError print ``error: <message>`` and exit 2.

    Inside a Hydra multirun the error is re-raised instead, so that the sweeper records the one
    trial as failed and goes on with the others.
    """
    import signal

    # SIGTERM (kill, a scheduler's time limit) becomes SystemExit, so `finally` blocks run and an MLflow
    # run ends KILLED instead of staying RUNNING forever.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    shield_requeue_from_sigterm()  # in a submitit job: a preempted trial is requeued, not failed
    try:
        return task(*args, **kwargs)
    except UserError as err:
        if _in_multirun():
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def exit_now(status: int = 0) -> NoReturn:
    """End the process as a normal exit would, without the interpreter's teardown.

    After a command's work, Python frees every module and object and TensorFlow destroys its thread pools
    and kernels: 1.3-1.9 s a run in which nothing a user keeps is written (issue 29). The rest of a normal
    exit happens first, in its order: threads that are not daemons are joined (with the callbacks
    `threading` runs before that), atexit handlers run (MLflow ends a run left open, logging flushes and
    closes its files), stdout and stderr are flushed. Then ``os._exit``. Only for a command's
    ``__main__``, never inside a library call or a notebook. Under a profiler (``python -m cProfile``),
    which writes its results once the command's code returns, it is a plain ``sys.exit``."""
    if sys.getprofile() is not None:
        sys.exit(status)
    import atexit
    import contextlib
    import os
    import threading

    # what Py_FinalizeEx does first; private, so fall back to joining the threads where it is missing
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    else:  # pragma: no cover - every CPython bloodcell supports has threading._shutdown
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        # a closed pipe or stream: a normal exit would lose what is left in it too
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def compose(overrides: list[str], config_name: str = "train", hydra_config: bool = False) -> DictConfig:
    """The config ``python -m bloodcell.<config_name> <overrides>`` would run with, through Hydra's compose
    API (benchmarks, notebooks): same conf/ groups, presets and override grammar, no run directory. With
    ``hydra_config`` it includes Hydra's own node (``hydra.sweeper``, ``hydra.overrides``, ...)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bloodcell import PROJECT_ROOT

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        return hydra_compose(config_name, overrides=overrides, return_hydra_config=hydra_config)
