"""The sweeper's one options dataclass (hydra_plugins/bloodcell_optuna_sweeper/config.py): one block per
table entry, and every sweeps/*.yaml file goes through it."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from bloodcell.sweep.tables import PRUNERS, SAMPLERS

# config.BloodcellOptunaSweeperConf is looked up when a test runs: Hydra's plugin scan (any compose in the
# same session) executes config.py again in place, so a class imported at collection would be a stale one
from hydra_plugins.bloodcell_optuna_sweeper import config
from hydra_plugins.bloodcell_optuna_sweeper.config import options_from
from tests.helpers import REPO

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def test_sampler_and_pruner_blocks_are_the_tables():
    options = config.BloodcellOptunaSweeperConf()
    for block, table in ((options.sampler, SAMPLERS), (options.pruner, PRUNERS)):
        names = [f.name for f in dataclasses.fields(block)]
        assert names[-len(table) :] == list(table)
        for name, choice in table.items():
            assert getattr(block, name) == choice.defaults
            assert getattr(block, name) is not choice.defaults  # a copy: an override cannot change the table
    assert (options.sampler.name, options.sampler.seed, options.pruner.name) == ("tpe", None, "median")


def test_hydra_composes_the_same_keys():
    node = OmegaConf.structured(config.BloodcellOptunaSweeperConf)
    assert set(node.sampler) == {"name", "seed", *SAMPLERS}
    assert set(node.pruner) == {"name", *PRUNERS}
    with pytest.raises(ConfigAttributeError):
        node.sampler.bogus = 1  # a misspelt block fails as before
    with pytest.raises(ValidationError):
        node.sampler.seed = "abc"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweeps_file_round_trips_through_the_options(path):
    written = OmegaConf.to_container(OmegaConf.load(path).hydra.sweeper)
    options = options_from(written)
    assert isinstance(options, config.BloodcellOptunaSweeperConf)
    for key, value in written.items():
        if key in ("sampler", "pruner"):
            block = getattr(options, key)
            assert block.name == value["name"]
            for name, kwargs in value.items():
                if isinstance(kwargs, dict):  # the file's keywords over the table's
                    table = SAMPLERS if key == "sampler" else PRUNERS
                    assert getattr(block, name) == {**table[name].defaults, **kwargs}
        else:
            assert getattr(options, key) == value, key
    # back to a config and again: nothing lost
    again = options_from(OmegaConf.to_container(OmegaConf.structured(options)))
    assert again == options


def test_options_from_takes_nodes_typed_by_a_class_of_another_module_instance():
    # Hydra execs config.py outside sys.modules: the nodes it hands the sweeper are typed by classes that
    # are not this module's
    source = Path(config.__file__).read_text()
    exec_module = types.ModuleType("hydra_exec_copy")
    exec(compile(source, config.__file__, "exec", dont_inherit=True), exec_module.__dict__)
    assert exec_module.BloodcellOptunaSweeperConf is not config.BloodcellOptunaSweeperConf
    node = OmegaConf.structured(exec_module.BloodcellOptunaSweeperConf)
    node.sampler.tpe.n_startup_trials = 3
    options = options_from({key: node[key] for key in node if key != "_target_"})
    assert options.sampler.tpe["n_startup_trials"] == 3
    assert options == dataclasses.replace(
        config.BloodcellOptunaSweeperConf(), sampler=options.sampler
    )  # the rest are the defaults


def test_options_from_rejects_what_hydra_would():
    with pytest.raises(ConfigKeyError):
        options_from({"n_trails": 3})
    with pytest.raises(ValidationError):
        options_from({"n_trials": "many"})
