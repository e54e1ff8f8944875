"""The sampler and pruner tables (bloodcell.sweep.tables): every entry builds, and its defaults are
Optuna's own (issue 16, item 7: no value that differs from Optuna's default without a measured reason)."""

from __future__ import annotations

import inspect
import warnings

import optuna
import pytest

from bloodcell.core.errors import UserError
from bloodcell.sweep.tables import PRUNERS, SAMPLERS, make_pruner, make_sampler

#: keywords whose table value is not Optuna's default, and why (Optuna has none for these)
NO_OPTUNA_DEFAULT = {("percentile", "percentile")}  # PercentilePruner's percentile is required


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_builds_from_its_defaults(name):
    args = ({"x": [0, 1]},) if name == "grid" else ()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = make_sampler(name, SAMPLERS[name].defaults, *args)
    assert type(sampler).__name__ == SAMPLERS[name].cls


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_every_pruner_builds_from_its_defaults(name):
    # the threshold pruner needs a bound: it has no sensible default
    kwargs = {**PRUNERS[name].defaults, **({"lower": 0.3} if name == "threshold" else {})}
    pruner = make_pruner({"name": name, "kwargs": kwargs})
    assert type(pruner).__name__ == PRUNERS[name].cls


@pytest.mark.parametrize(
    ("kind", "table", "module"),
    [("sampler", SAMPLERS, optuna.samplers), ("pruner", PRUNERS, optuna.pruners)],
)
def test_table_defaults_are_optunas_own(kind, table, module):
    for name, choice in table.items():
        parameters = inspect.signature(getattr(module, choice.cls).__init__).parameters
        for key, value in choice.defaults.items():
            assert key in parameters, f"{kind} {name}: {choice.cls} has no keyword {key}"
            if (name, key) in NO_OPTUNA_DEFAULT:
                continue
            assert value == parameters[key].default, (
                f"{kind} {name}.{key} is {value!r}, Optuna's default is {parameters[key].default!r}"
            )


def test_tpe_follows_optuna_5_multivariate_and_constant_liar():
    defaults = SAMPLERS["tpe"].defaults
    # None = Optuna decides: multivariate TPE for a single objective
    assert defaults["multivariate"] is None
    assert defaults["constant_liar"] is True


def test_no_pruner_spec_means_no_pruning_and_names_are_case_blind():
    assert isinstance(make_pruner(None), optuna.pruners.NopPruner)
    assert isinstance(
        make_pruner({"name": "Median", "kwargs": {"n_startup_trials": 2}}), optuna.pruners.MedianPruner
    )
    assert isinstance(make_sampler("TPE", {"seed": 1}), optuna.samplers.TPESampler)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: make_sampler("bayes", {}), "unknown sampler 'bayes'; choose one of tpe, random, grid"),
        (lambda: make_pruner({"name": "early"}), "unknown pruner 'early'; choose one of median, percentile"),
        (lambda: make_sampler("tpe", {"n_startup": 3}), "sampler tpe: "),
        (lambda: make_pruner({"name": "percentile", "kwargs": {"percentile": 150.0}}), "pruner percentile: "),
    ],
)
def test_a_bad_name_or_setting_is_one_user_error(build, message):
    with pytest.raises(UserError) as caught:
        build()
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)
