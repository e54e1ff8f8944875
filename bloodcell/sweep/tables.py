"""The samplers and pruners a sweep can name, one table each, and the functions that build them.

``hydra.sweeper.sampler.name`` (``pruner.name``) picks an entry; the block of that name
(``hydra.sweeper.sampler.<name>``) holds the Optuna class's keyword arguments, starting from the entry's
``defaults``. These tables are the only list: the sweeper's config (hydra_plugins/bloodcell_optuna_sweeper/
config.py) makes one block per entry, the sweeper builds its sampler here and every trial process its pruner
(from the spec the sweeper stores on the trial), so adding a sampler or pruner is one line here.

Imports nothing but the standard library at import time: Hydra imports the sweeper's config, and so this
module, at the start of any Hydra app. Optuna loads when something is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from bloodcell.core.errors import UserError

if TYPE_CHECKING:
    from optuna.pruners import BasePruner
    from optuna.samplers import BaseSampler


class Choice(NamedTuple):
    #: the class's name in optuna.samplers (optuna.pruners)
    cls: str
    #: the keyword arguments its block starts with; any other keyword of the class can be added with
    #: +hydra.sweeper.sampler.<name>.<keyword>=...
    defaults: dict[str, Any]


SAMPLERS: dict[str, Choice] = {
    # Optuna 5's own defaults (TPESampler.__init__): n_startup_trials 10, multivariate None (= multivariate
    # TPE for one objective), constant_liar True (a batch of parallel trials spreads out). Listed so that
    # `hydra.sweeper.sampler.tpe.multivariate=false` works without a `+`; no measurement here argues for
    # other values.
    "tpe": Choice("TPESampler", {"n_startup_trials": 10, "multivariate": None, "constant_liar": True}),
    "random": Choice("RandomSampler", {}),
    "grid": Choice("GridSampler", {}),  # the grid itself is the search space (choice / range only)
    "cmaes": Choice("CmaEsSampler", {"n_startup_trials": 1, "consider_pruned_trials": False}),
    "qmc": Choice("QMCSampler", {"qmc_type": "sobol", "scramble": False}),
    "gp": Choice("GPSampler", {"n_startup_trials": 10}),
}

#: Steps are epochs, counted across both training phases; in a repeated or cross-validated trial they are
#: the repeats (folds) instead, one report per repeat (fold) with its objective (bloodcell.training.repeats).
PRUNERS: dict[str, Choice] = {
    "median": Choice(
        "MedianPruner", {"n_startup_trials": 5, "n_warmup_steps": 0, "interval_steps": 1, "n_min_trials": 1}
    ),
    "percentile": Choice(
        "PercentilePruner",
        {
            "percentile": 25.0,
            "n_startup_trials": 5,
            "n_warmup_steps": 0,
            "interval_steps": 1,
            "n_min_trials": 1,
        },
    ),
    "successive_halving": Choice(
        "SuccessiveHalvingPruner",
        {"min_resource": "auto", "reduction_factor": 4, "min_early_stopping_rate": 0, "bootstrap_count": 0},
    ),
    "hyperband": Choice(
        "HyperbandPruner",
        {"min_resource": 1, "max_resource": "auto", "reduction_factor": 3, "bootstrap_count": 0},
    ),
    # prunes a trial whose objective is below lower / above upper (e.g. lower: 0.3 for accuracy)
    "threshold": Choice(
        "ThresholdPruner", {"lower": None, "upper": None, "n_warmup_steps": 0, "interval_steps": 1}
    ),
    # for repeated and cross-validated trials (hydra.sweeper.repeats, data.cv.folds), whose steps are
    # repeats or folds: stops a trial once a Wilcoxon signed-rank test of its values against the best
    # trial's, paired by step, says it is worse at p < p_threshold; never before n_startup_steps steps
    "wilcoxon": Choice("WilcoxonPruner", {"p_threshold": 0.1, "n_startup_steps": 2}),
    "none": Choice("NopPruner", {}),
}


def make_sampler(name: str, kwargs: Mapping[str, Any], *args: Any) -> BaseSampler:
    """The Optuna sampler ``name`` of SAMPLERS; ``args`` go first (the grid of GridSampler)."""
    import optuna

    return _build("sampler", SAMPLERS, optuna.samplers, name, args, kwargs)


def make_pruner(spec: Mapping[str, Any] | None) -> BasePruner:
    """An Optuna pruner from ``{"name": ..., "kwargs": {...}}`` (the spec the sweeper stores on each trial;
    no name = no pruning)."""
    import optuna

    spec = dict(spec or {})
    return _build("pruner", PRUNERS, optuna.pruners, str(spec.get("name") or "none"), (), spec.get("kwargs"))


def _build(
    kind: str, table: dict[str, Choice], module: Any, name: str, args: tuple, kwargs: Mapping[str, Any] | None
) -> Any:
    name = name.lower()
    if name not in table:
        raise UserError(f"unknown {kind} '{name}'; choose one of {', '.join(table)}")
    try:
        return getattr(module, table[name].cls)(*args, **dict(kwargs or {}))
    except (TypeError, ValueError, ImportError) as err:  # a bad keyword or value; a missing extra package
        raise UserError(f"{kind} {name}: {err}") from None
