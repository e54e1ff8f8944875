"""The one validation pass of a train config (bloodcell.core.settings): every preset passes, every value
outside its domain is one UserError line naming the key, the value and a fix. No subprocess, no training."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from bloodcell import PROJECT_ROOT
from bloodcell.core.cli import compose
from bloodcell.core.errors import UserError
from bloodcell.data import Arrays, min_images, split_arrays
from bloodcell.training.recipe import check_config as check_train_config
from tests.helpers import TINY


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["+experiment=quickstart"],
        ["+experiment=effnetb2"],
        ["+experiment=mobilenet_cpu"],
        ["+experiment=lite0_cpu"],
        TINY,
        *[[f"+sweeps={path.stem}"] for path in sorted((PROJECT_ROOT / "sweeps").glob("*.yaml"))],
        *[
            [*TINY, f"augmentation={path.stem}"]
            for path in (PROJECT_ROOT / "conf" / "augmentation").glob("*")
        ],
        [*TINY, "data=folder", "data.path=somewhere"],
        [*TINY, "data=medmnist", "data.size=28"],
    ],
    ids=lambda overrides: " ".join(overrides) or "defaults",
)
def test_every_shipped_config_passes(overrides, monkeypatch):
    # the weights file of mobilenet_cpu lives in ../shared: its existence is not what this checks
    monkeypatch.setattr("bloodcell.models.backbones.check_weights", lambda weights: weights)
    check_train_config(compose(overrides))


@pytest.mark.parametrize(
    "override, fragments",
    [
        (
            "trainer.batch_size=0",
            ["trainer.batch_size=0", ">= 1", "e.g. trainer.batch_size=32"],
        ),
        ("trainer.batch_size=-4", ["trainer.batch_size=-4", ">= 1"]),
        ("trainer.lr=-1", ["trainer.lr=-1", "> 0", "e.g. trainer.lr=1e-3"]),
        ("trainer.lr=0", ["trainer.lr=0", "> 0"]),
        ("finetune.lr=0", ["finetune.lr=0", "> 0"]),
        ("augmentation.strength=2", ["augmentation.strength=2", "<= 1"]),
        ("augmentation.strength=-0.1", ["augmentation.strength=-0.1", ">= 0"]),
        ("data.limit=5", ["data.limit=5", "48 images", "data.limit=null"]),
        ("data.per_class=2", ["data.per_class=2", "data.per_class=6"]),
        ("data.val_fraction=0", ["data.val_fraction=0", "> 0"]),
        ("data.test_fraction=1.5", ["data.test_fraction=1.5", "< 1"]),
        ("data.val_fraction=0.9", ["data.val_fraction=0.9", "sum below 1"]),
        ("trainer.epochs=0", ["trainer.epochs=0", ">= 1"]),
        ("finetune.epochs=-1", ["finetune.epochs=-1", ">= 0"]),
        ("trainer.lr_decay_rate=0", ["trainer.lr_decay_rate=0"]),
        ("trainer.label_smoothing=1", ["trainer.label_smoothing=1", "< 1"]),
        ("trainer.time_limit_minutes=0", ["trainer.time_limit_minutes=0"]),
        ("trainer.checkpoint.keep=0", ["trainer.checkpoint.keep=0"]),
        ("finetune.unfreeze_blocks=-2", ["finetune.unfreeze_blocks=-2", "-1 = all"]),
        ("head.dropout=[0.2,1.5]", ["head.dropout.1=1.5", "< 1"]),
        ("head.units=[0]", ["head.units.0=0"]),
        ("trainer.mixed_precision=float8", ["trainer.mixed_precision='float8'", "mixed_bfloat16"]),
        ("trainer.distribute=ring", ["trainer.distribute='ring'", "null or mirrored"]),
        ("data.format=parquet", ["data.format='parquet'", "npz, folder, medmnist, demo"]),
        ("objective=val_acc", ["objective='val_acc'", "val_accuracy"]),
        ("seed=-1", ["seed=-1", ">= 0"]),
        ("trainer.batch_size='32'", ["trainer.batch_size='32'", "integer"]),
        ("backbone.name=resnet9000", ["resnet9000", "small_cnn"]),
        ("augmentation.where=gpu", ["augmentation.where='gpu'", "pipeline"]),
    ],
)
def test_a_value_outside_its_domain_is_one_line_with_the_fix(override, fragments):
    with pytest.raises(UserError) as caught:
        check_train_config(compose([*TINY, override]))
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_several_bad_values_name_the_first_and_count_the_others():
    with pytest.raises(UserError, match=r"\(and 2 more: trainer.batch_size, trainer.lr\)"):
        check_train_config(
            compose([*TINY, "trainer.lr=0", "trainer.batch_size=0", "augmentation.strength=3"])
        )


def test_a_password_written_into_the_config_is_warned_about(caplog, monkeypatch):
    monkeypatch.setenv("BLOODCELL_TEST_URL", "postgresql://u:from-env@h/db")
    with caplog.at_level(logging.WARNING, logger="bloodcell.config"):
        check_train_config(
            compose(
                [*TINY, "tracking.uri=postgresql://u:plainpw@h/db", "+hook_url=${oc.env:BLOODCELL_TEST_URL}"]
            )
        )
    assert len(caplog.records) == 1, caplog.text
    assert "tracking.uri" in caplog.text and "${oc.env:" in caplog.text and "plainpw" not in caplog.text


@pytest.mark.parametrize("fractions", [(0.15, 0.15), (0.1, 0.2), (0.3, 0.3), (0.05, 0.05)])
def test_min_images_is_exactly_what_the_stratified_split_takes(fractions):
    """data.limit's bound (min_images) is the split's own: one image fewer and the split refuses."""
    val, test = fractions
    needed = min_images(8, val, test)
    labels = np.arange(needed) % 8
    arrays = Arrays(np.zeros((needed, 2, 2, 3), np.uint8), labels, "f", "s")
    splits = split_arrays(arrays, val, test, seed=0)
    assert all(len(np.unique(part.labels)) == 8 for part in (splits.train, splits.val, splits.test))
    fewer = Arrays(arrays.images[1:], labels[1:], "f", "s")
    with pytest.raises(UserError, match=f"needs at least {needed}"):
        split_arrays(fewer, val, test, seed=0)


def test_a_reference_to_an_unset_environment_variable_is_one_line(monkeypatch):
    monkeypatch.delenv("BLOODCELL_TEST_UNSET", raising=False)
    with pytest.raises(UserError, match=r"does not resolve \(tracking.uri\).*BLOODCELL_TEST_UNSET"):
        check_train_config(compose([*TINY, "tracking.uri=${oc.env:BLOODCELL_TEST_UNSET}"]))
