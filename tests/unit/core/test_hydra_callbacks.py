"""The files Hydra saves get the masking of every other record (issue 26): the callback rewriting them, the
command configs that save files carrying it, and the plain-password warning said once. No subprocess."""

from __future__ import annotations

import logging

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bloodcell import PROJECT_ROOT
from bloodcell.core import settings
from bloodcell.core.hydra_callbacks import MaskSavedSecrets, mask_saved_config

COMMANDS = sorted(path.stem for path in (PROJECT_ROOT / "conf").glob("*.yaml"))


def test_a_saved_config_is_rewritten_masked_with_its_interpolations_kept(tmp_path):
    path = tmp_path / "config.yaml"
    OmegaConf.save(
        OmegaConf.create(
            {
                "tracking": {"uri": "http://alice:planted@host:5999", "experiment": "x"},
                "storage": "${oc.env:OPTUNA_STORAGE}",
                "overrides": ["tracking.uri=http://alice:planted@host:5999", "seed=1"],
                "name": "${tracking.experiment}",
            }
        ),
        path,
    )
    assert mask_saved_config(path)
    text = path.read_text()
    assert "planted" not in text
    saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert saved == {
        "tracking": {"uri": "http://alice:***@host:5999", "experiment": "x"},
        "storage": "${oc.env:OPTUNA_STORAGE}",
        "overrides": ["tracking.uri=http://alice:***@host:5999", "seed=1"],
        "name": "${tracking.experiment}",
    }
    assert not mask_saved_config(path)  # nothing left to mask: left alone
    assert not mask_saved_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_that_saves_its_config_masks_it(command):
    """Hydra saves .hydra/*.yaml unless output_subdir is null; such a command must carry the callback."""
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        cfg = compose(command, return_hydra_config=True)
    if cfg.hydra.output_subdir is None:
        return
    targets = [str(callback.get("_target_")) for callback in cfg.hydra.callbacks.values()]
    assert f"{MaskSavedSecrets.__module__}.{MaskSavedSecrets.__name__}" in targets, command


def test_a_plain_password_is_warned_about_once_per_process(caplog, monkeypatch):
    """A repeated or cross-validated run checks its config once per member: the warning is not repeated."""
    monkeypatch.setattr(settings, "_WARNED_PLAIN_SECRETS", set())
    cfg = OmegaConf.create({"tracking": {"uri": "http://alice:planted@host:5999"}, "seed": 1})
    with caplog.at_level(logging.WARNING, logger="bloodcell.config"):
        settings.warn_plain_secrets(cfg)
        settings.warn_plain_secrets(cfg)
        settings.warn_plain_secrets({"hydra.sweeper.storage": "postgresql://u:planted@db/x", "seed": 1})
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("tracking.uri holds a password") and "planted" not in lines[0]
    assert lines[1].startswith("hydra.sweeper.storage holds a password")
