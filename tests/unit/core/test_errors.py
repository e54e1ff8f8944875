"""How a run's ending exception is told apart: Optuna's prune, asked without importing Optuna."""

from __future__ import annotations

import sys

import optuna

from bloodcell.core.errors import UserError, is_prune


def test_a_prune_is_told_from_every_other_ending():
    assert is_prune(optuna.TrialPruned("pruned after epoch 3"))
    for err in (
        ValueError("x"),
        UserError("x"),
        KeyboardInterrupt(),
        SystemExit(1),
        optuna.exceptions.OptunaError(),
    ):
        assert not is_prune(err)


def test_a_process_without_optuna_is_not_made_to_import_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "optuna")
    assert not is_prune(RuntimeError("x"))
    assert "optuna" not in sys.modules
