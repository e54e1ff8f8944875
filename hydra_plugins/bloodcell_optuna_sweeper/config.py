"""The sweeper's configuration (``hydra.sweeper.*``), registered as ``hydra/sweeper=bloodcell_optuna``."""
# no `from __future__ import annotations`: Hydra execs plugin modules outside sys.modules, which breaks dataclasses with string annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class SamplerConf:
    #: tpe | random | grid | cmaes | qmc | gp
    name: str = "tpe"
    seed: Optional[int] = None
    #: any other keyword of the Optuna sampler class, e.g. {n_startup_trials: 5}
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PrunerConf:
    #: median | percentile | successive_halving | hyperband | threshold | none
    name: str = "median"
    #: keywords of the Optuna pruner class, e.g. {n_startup_trials: 3, n_warmup_steps: 2}
    kwargs: Dict[str, Any] = field(default_factory=dict)


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
    #: seconds between the "still running" marks of this process's trials; a trial whose mark is older
    #: than 4 intervals (or whose sweep process on this host is gone) counts as interrupted
    heartbeat_interval: int = 30


ConfigStore.instance().store(
    group="hydra/sweeper", name="bloodcell_optuna", node=BloodcellOptunaSweeperConf, provider="bloodcell"
)
