"""The sweeper's configuration (``hydra.sweeper.*``), registered as ``hydra/sweeper=bloodcell_optuna``."""
# no `from __future__ import annotations`: Hydra execs plugin modules outside sys.modules, which breaks dataclasses with string annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


def _settings(**defaults: Any) -> Any:
    return field(default_factory=lambda: dict(defaults))


@dataclass
class SamplerConf:
    """``name`` picks the sampler; the block of that name holds its keyword arguments (any keyword of the
    Optuna class; add one that is not listed with ``+hydra.sweeper.sampler.tpe.<keyword>=...``)."""

    #: tpe | random | grid | cmaes | qmc | gp
    name: str = "tpe"
    seed: Optional[int] = None
    tpe: Dict[str, Any] = _settings(n_startup_trials=10, multivariate=False, constant_liar=False)
    random: Dict[str, Any] = _settings()
    grid: Dict[str, Any] = _settings()  # the grid itself is the search space (choice / range only)
    cmaes: Dict[str, Any] = _settings(n_startup_trials=1, consider_pruned_trials=False)
    qmc: Dict[str, Any] = _settings(qmc_type="sobol", scramble=False)
    gp: Dict[str, Any] = _settings(n_startup_trials=10)


@dataclass
class PrunerConf:
    """``name`` picks the pruner; the block of that name holds its keyword arguments. Steps are epochs,
    counted across both training phases."""

    #: median | percentile | successive_halving | hyperband | threshold | none
    name: str = "median"
    median: Dict[str, Any] = _settings(n_startup_trials=5, n_warmup_steps=0, interval_steps=1, n_min_trials=1)
    percentile: Dict[str, Any] = _settings(
        percentile=25.0, n_startup_trials=5, n_warmup_steps=0, interval_steps=1, n_min_trials=1
    )
    successive_halving: Dict[str, Any] = _settings(
        min_resource="auto", reduction_factor=4, min_early_stopping_rate=0, bootstrap_count=0
    )
    hyperband: Dict[str, Any] = _settings(
        min_resource=1, max_resource="auto", reduction_factor=3, bootstrap_count=0
    )
    #: prunes a trial whose objective is below lower / above upper (e.g. lower: 0.3 for accuracy)
    threshold: Dict[str, Any] = _settings(lower=None, upper=None, n_warmup_steps=0, interval_steps=1)
    none: Dict[str, Any] = _settings()


@dataclass
class BloodcellOptunaSweeperConf:
    _target_: str = "hydra_plugins.bloodcell_optuna_sweeper.optuna_sweeper.BloodcellOptunaSweeper"
    #: the study to create or resume; null = the chosen sweeps file's name, else the job's name
    study_name: Optional[str] = None
    #: an Optuna storage: null = Optuna's journal file <project root>/mlruns/optuna.journal;
    #: journal:<path> for another journal file, or any SQLAlchemy URL (sqlite:///..., postgresql://...)
    storage: Optional[str] = None
    #: maximize | minimize (of the app's `objective`)
    direction: str = "maximize"
    #: trials of the study in total, over every run and process that works on it (a resumed study
    #: runs only what is missing)
    n_trials: int = 20
    #: trials launched at once (one batch); in parallel with hydra/launcher=joblib
    n_jobs: int = 1
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    #: the search space, in Hydra's sweep syntax: {finetune.lr: "tag(log, interval(1e-5, 1e-3))"};
    #: sweep overrides on the command line add to it
    params: Optional[Dict[str, str]] = None
    #: stop the sweep (exit 1) after this many trials in a row failed with an error, e.g. a data path that
    #: does not exist; null = never stop
    max_consecutive_failures: Optional[int] = 5
    #: seconds between the "still running" marks of this process's trials; a trial whose mark is older
    #: than 4 intervals (or whose sweep process on this host is gone) counts as interrupted
    heartbeat_interval: int = 30


ConfigStore.instance().store(
    group="hydra/sweeper", name="bloodcell_optuna", node=BloodcellOptunaSweeperConf, provider="bloodcell"
)
