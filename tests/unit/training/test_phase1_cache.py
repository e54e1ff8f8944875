"""The phase-1 key (training.phase1_cache): what must miss the cache and what must not, when reuse is off,
and the lock that makes a parallel run wait. No subprocess, no training (test_phase1_reuse.py trains)."""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path

import pytest
from omegaconf import DictConfig

from bloodcell.core.cli import compose
from bloodcell.core.errors import UserError
from bloodcell.training import phase1_cache
from bloodcell.training.recipe import check_config as check_train_config
from tests.helpers import TINY

TAGS = {"data_fingerprint": "d" * 64, "data_source": "demo", "split_fingerprint": "s" * 64}


@functools.cache
def config(*overrides: str) -> DictConfig:
    return compose([*TINY, *overrides])


def key(*overrides: str, tags: dict[str, str] | None = None, replicas: int = 1) -> str:
    return phase1_cache.phase1_key(config(*overrides), tags or TAGS, replicas)


@pytest.mark.parametrize(
    "override",
    [
        "seed=1",
        "head.units=[32]",
        "head.dropout=[0.3]",
        "backbone.kwargs.filters=[8,16,32,48]",
        "augmentation.strength=0.3",
        "augmentation=heavy",
        "trainer.lr=1e-4",
        "trainer.epochs=2",
        "trainer.early_stopping_patience=1",
        "trainer.class_weight=null",
        "trainer.batch_size=16",
        "data.val_fraction=0.2",
        "data.image_size=48",
    ],
)
def test_a_phase1_setting_misses(override: str) -> None:
    assert key(override) != key()


def test_other_data_split_or_replicas_miss() -> None:
    assert key(tags={**TAGS, "data_fingerprint": "e" * 64}) != key()
    assert key(tags={**TAGS, "split_fingerprint": "t" * 64}) != key()
    assert key(tags={**TAGS, "data_fingerprint_cleaned": "c" * 64}) != key()
    assert key(replicas=2) != key()


@pytest.mark.parametrize(
    "override",
    [
        "finetune.lr=1e-3",
        "finetune.unfreeze_blocks=2",
        "finetune.epochs=5",
        "finetune.augmentation_strength=0.9",
        "trainer.verbose=2",
        "trainer.resume=auto",
        "trainer.checkpoint.keep=3",
        "trainer.test_tta=true",
        "tracking.uri=sqlite:///elsewhere.db",
        "tracking.log_model=false",
        "objective=val_loss",
        "+trial.number=3",
    ],
)
def test_phase2_and_recording_settings_hit(override: str) -> None:
    assert key(override) == key()


def test_where_the_data_lies_does_not_matter() -> None:
    # the fingerprints are the data's identity
    assert key("+data.path=/elsewhere/set.npz", tags={**TAGS, "data_source": "/elsewhere/set.npz"}) == key()


def test_the_code_is_in_the_key() -> None:
    parts = phase1_cache.key_parts(config(), TAGS)
    assert set(parts["versions"]) == {"bloodcell", "code", "tensorflow", "keras"}
    assert parts["versions"]["code"] == phase1_cache.code_digest()
    assert "finetune" not in parts["config"] and "tracking" not in parts["config"]


def test_off_when_asked_or_with_a_time_limit(tmp_path: Path) -> None:
    def slot(*overrides: str) -> phase1_cache.Phase1Cache | None:
        cfg = config(*overrides)
        return phase1_cache.for_run(cfg, check_train_config(cfg).trainer, TAGS, tmp_path, 1, "r")

    assert slot() is not None  # on by default
    for override in ("trainer.reuse_phase1=false", "trainer.time_limit_minutes=5"):
        assert slot(override) is None
    assert phase1_cache.Phase1Cache(tmp_path, key(), "r").load() is None  # cold: no entry


@pytest.mark.parametrize(
    "override, fragment",
    [("finetune.augmentation_strength=1.5", "<= 1"), ("trainer.reuse_phase1=maybe", "true or false")],
)
def test_the_new_keys_are_checked(override: str, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        check_train_config(config(override))


def test_a_second_run_waits_for_the_first_to_release_its_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = (phase1_cache.Phase1Cache(tmp_path, "k" * 24, run) for run in ("a", "b"))
    order: list[str] = []
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with first.locked():
            order.append("a in")
            held.set()
            release.wait(60)
            order.append("a out")

    def wait() -> None:
        with second.locked():
            order.append("b in")

    caplog.set_level(logging.INFO, "bloodcell.train")
    a = threading.Thread(target=hold)
    a.start()
    assert held.wait(60)
    b = threading.Thread(target=wait)
    b.start()
    for _ in range(600):  # b says it waits (its non-blocking try failed) before it blocks
        if any("another run is training it" in r.getMessage() for r in caplog.records):
            break
        threading.Event().wait(0.1)
    assert order == ["a in"]
    release.set()
    a.join(60)
    b.join(60)
    assert order == ["a in", "a out", "b in"]
