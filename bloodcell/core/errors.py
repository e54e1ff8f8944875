"""The exceptions a run ends with: `UserError`, which entry points turn into a single-line message and a
non-zero exit, and Optuna's prune (`is_prune`)."""

from __future__ import annotations

import sys


class UserError(Exception):
    """A problem the user can fix (bad path, bad data, unknown name).

    The message is one line that names the problem and the fix; entry points print it as
    ``error: <message>`` and exit with status 2, without a traceback.
    """


def is_prune(err: BaseException) -> bool:
    """Whether ``err`` is Optuna's ``TrialPruned``, asked without importing Optuna: a process that never
    imported it cannot have raised it, and its import is a third of a second of every run outside a
    sweep."""
    optuna = sys.modules.get("optuna")
    return optuna is not None and isinstance(err, optuna.TrialPruned)
