"""conf/cleaning/default.yaml is the only source of the cleaning defaults (issue 13)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from bloodcell.core.errors import UserError
from bloodcell.data.cleaning import DEFAULTS_FILE, config_digest, defaults, resolve_cfg


def test_no_config_means_the_yaml_file():
    assert resolve_cfg(None) == OmegaConf.to_container(OmegaConf.load(DEFAULTS_FILE), resolve=True)


def test_a_partial_config_keeps_the_file_values_for_the_rest():
    cfg = resolve_cfg({"outliers": {"max_z": 7.5, "min_spread": {"od_r": 0.5}}})
    base = defaults()
    assert cfg["outliers"]["max_z"] == 7.5 and cfg["outliers"]["min_spread"]["od_r"] == 0.5
    assert cfg["outliers"]["min_spread"]["od_g"] == base["outliers"]["min_spread"]["od_g"]
    assert cfg["duplicates"] == base["duplicates"]
    assert config_digest({"outliers": {"max_z": 7.5}}) != config_digest(None)


def test_an_omegaconf_node_is_accepted():
    node = OmegaConf.create({"flat": {"min_std": 2.0}})
    assert resolve_cfg(node)["flat"]["min_std"] == 2.0


def test_defaults_are_copies():
    defaults()["outliers"]["max_z"] = -1
    assert defaults()["outliers"]["max_z"] != -1


@pytest.mark.parametrize(
    ("cfg", "where"),
    [
        ({"outliers": {"min_spread": {"colourfulness": 1.0}}}, "cleaning.outliers.min_spread"),
        ({"report": {"rows": 3}}, "cleaning.report"),
        ({"nonsense": {}}, "unknown section"),
    ],
)
def test_unknown_keys_at_any_depth_are_user_errors(cfg, where):
    with pytest.raises(UserError, match=where):
        resolve_cfg(cfg)
