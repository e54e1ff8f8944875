"""tracking.explain=auto (issue 29): a sweep trial draws its Grad-CAM and error sheets only when it beats
the study's best finished trial; single runs, and true/false, as the setting says. Real Optuna studies."""

from __future__ import annotations

import optuna
import pytest

from bloodcell.training.record import wants_explanations


def study_with(values: list[float], direction: str = "maximize") -> optuna.Study:
    study = optuna.create_study(direction=direction)
    for value in values:
        study.add_trial(optuna.trial.create_trial(value=value))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING))
    return study


def test_a_run_outside_a_sweep_draws_them_unless_switched_off():
    assert wants_explanations("auto", None, 0.1)
    assert wants_explanations(True, None, 0.1)
    assert not wants_explanations(False, None, 0.9)


def test_the_first_trial_to_finish_draws_them():
    assert wants_explanations("auto", study_with([]), 0.2)


@pytest.mark.parametrize(
    ("direction", "values", "objective", "draws"),
    [
        ("maximize", [0.6, 0.8], 0.7, False),
        ("maximize", [0.6, 0.8], 0.8, True),  # a tie with the best is a best trial too
        ("maximize", [0.6, 0.8], 0.9, True),
        ("minimize", [0.5, 0.3], 0.4, False),
        ("minimize", [0.5, 0.3], 0.2, True),
    ],
)
def test_a_trial_draws_them_only_when_it_beats_the_study_so_far(direction, values, objective, draws):
    study = study_with(values, direction)
    assert wants_explanations("auto", study, objective) is draws
    # the switches win over the study
    assert wants_explanations(True, study, objective) and not wants_explanations(False, study, objective)


def test_a_storage_that_cannot_answer_means_drawing_them():
    class Unreachable:
        @property
        def best_value(self) -> float:
            raise ConnectionError("database is down")

    assert wants_explanations("auto", Unreachable(), 0.1)  # type: ignore[arg-type]
