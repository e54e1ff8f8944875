"""The sweeper's configuration (``hydra.sweeper.*``), registered as ``hydra/sweeper=bloodcell_optuna``.

`BloodcellOptunaSweeperConf` is the one description of the sweeper's options: Hydra composes
``hydra.sweeper`` from it, and the sweeper works on an instance of it (`options_from`).
"""
# no `from __future__ import annotations`: Hydra execs plugin modules outside sys.modules, which breaks
# dataclasses with string annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Dict, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from bloodcell.sweep.tables import PRUNERS, SAMPLERS, Choice


def _blocks(cls_name: str, doc: str, head: Dict[str, Tuple[Any, Any]], table: Dict[str, Choice]) -> Any:
    """A dataclass with the fields ``head`` (name: (type, default)), then one block per entry of ``table``
    holding that entry's default keyword arguments: the table stays the one list of samplers (pruners)."""
    fields = [(key, type_, field(default=default)) for key, (type_, default) in head.items()]
    fields += [(entry, Dict[str, Any], _copied(choice.defaults)) for entry, choice in table.items()]
    return make_dataclass(cls_name, fields, namespace={"__doc__": doc, "__module__": __name__})


def _copied(defaults: Dict[str, Any]) -> Any:  # a dataclasses.Field
    return field(default_factory=lambda: dict(defaults))


SamplerConf = _blocks(
    "SamplerConf",
    f"""``name`` picks the sampler ({" | ".join(SAMPLERS)}); the block of that name holds its keyword
    arguments (any keyword of the Optuna class; add one that is not listed with
    ``+hydra.sweeper.sampler.tpe.<keyword>=...``). The blocks and their defaults come from
    bloodcell.sweep.tables.SAMPLERS.""",
    {"name": (str, "tpe"), "seed": (Optional[int], None)},
    SAMPLERS,
)

PrunerConf = _blocks(
    "PrunerConf",
    f"""``name`` picks the pruner ({" | ".join(PRUNERS)}); the block of that name holds its keyword
    arguments. Steps are epochs, counted across both training phases (repeats or folds in a repeated or
    cross-validated trial: then use median, percentile, threshold or wilcoxon). The blocks and their
    defaults come from bloodcell.sweep.tables.PRUNERS.""",
    {"name": (str, "median")},
    PRUNERS,
)


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
    # Any for mypy, which cannot see the fields of classes made at import; OmegaConf types the two nodes
    # by their defaults all the same (a misspelt key or a wrong type fails)
    sampler: Any = field(default_factory=SamplerConf)
    pruner: Any = field(default_factory=PrunerConf)
    #: train each sampled point this many times, with seeds seed, seed+1, ... on the same split (child runs
    #: of the trial's run); the trial's objective is their mean and Optuna's steps are the repeats
    #: (bloodcell.training.repeats). Cross-validation is data.cv.folds instead
    repeats: int = 1
    #: the search space, in Hydra's sweep syntax: {finetune.lr: "tag(log, interval(1e-5, 1e-3))"};
    #: sweep overrides on the command line add to it
    params: Optional[Dict[str, str]] = None
    #: stop the sweep (exit 1) after this many trials in a row failed with an error, e.g. a data path that
    #: does not exist; null = never stop
    max_consecutive_failures: Optional[int] = 5
    #: seconds between the "still running" marks of this process's trials; a trial whose mark is older
    #: than 4 intervals (or whose sweep process on this host is gone) counts as interrupted
    heartbeat_interval: int = 30


def options_from(options: Mapping[str, Any]) -> BloodcellOptunaSweeperConf:
    """The sweeper's keyword arguments (``hydra.sweeper`` less ``_target_``, as Hydra instantiates it) as
    a `BloodcellOptunaSweeperConf`, resolved and type-checked."""
    # plain containers first: Hydra's nodes are typed by this module's classes as Hydra exec'd it, which
    # are not the classes of this (imported) module, and OmegaConf will not merge across the two
    plain = {
        key: OmegaConf.to_container(value, resolve=True)
        if isinstance(value, (DictConfig, ListConfig))
        else value
        for key, value in options.items()
        if key != "_target_"
    }
    merged = OmegaConf.merge(OmegaConf.structured(BloodcellOptunaSweeperConf), plain)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


ConfigStore.instance().store(
    group="hydra/sweeper", name="bloodcell_optuna", node=BloodcellOptunaSweeperConf, provider="bloodcell"
)
