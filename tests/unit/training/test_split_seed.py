"""data.split_seed (issue 27): the split is fixed by default, independent of the training seed, so runs
that differ only in seed are scored on the same test images; null splits by the seed, as runs did before,
and a run logged before the key existed is read back with the split it trained on."""

from __future__ import annotations

from types import SimpleNamespace

from omegaconf import OmegaConf

from bloodcell.core.cli import compose
from bloodcell.core.settings import train_settings
from bloodcell.training.run_data import load_splits, logged_settings
from tests.helpers import TINY


def split_of(*overrides: str) -> str:
    settings = train_settings(compose([*TINY, *overrides]))
    return load_splits(settings.data, settings.seed).splits.fingerprint()


def test_runs_that_differ_only_in_seed_share_the_split_unless_it_follows_the_seed():
    assert split_of("seed=1") == split_of("seed=2") == split_of("seed=2", "data.split_seed=42")
    assert split_of("seed=1", "data.split_seed=null") != split_of("seed=2", "data.split_seed=null")
    assert split_of("seed=1", "data.split_seed=7") != split_of("seed=1")


def test_a_run_logged_before_split_seed_existed_keeps_the_split_of_its_seed(tmp_path):
    cfg = compose([*TINY, "seed=5"])
    older = OmegaConf.to_container(cfg, resolve=True)
    del older["data"]["split_seed"]  # config.yaml as runs logged it before data.split_seed
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(older))
    run = SimpleNamespace(info=SimpleNamespace(artifact_uri=tmp_path.as_uri(), run_id="older"))
    settings = logged_settings(run)
    assert settings.data.split_seed is None and settings.seed == 5
    assert load_splits(settings.data, settings.seed).splits.fingerprint() == split_of(
        "seed=5", "data.split_seed=null"
    )
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))  # a run of today: its fixed split
    assert logged_settings(run).data.split_seed == 42
