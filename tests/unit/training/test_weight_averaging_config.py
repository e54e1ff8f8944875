"""Weight averaging's config (trainer.ema, finetune.swa): off by default, every bad value one UserError line
before anything starts, and the optimizer it asks for. No subprocess, no training."""

from __future__ import annotations

import pytest

from bloodcell.core.cli import compose
from bloodcell.core.errors import UserError
from bloodcell.training.recipe import check_config as check_train_config
from tests.helpers import TINY


def test_weight_averaging_is_off_by_default_and_the_presets_pass():
    for overrides in (
        [],
        ["+experiment=quickstart"],
        [*TINY, "trainer.ema=true"],
        [*TINY, "finetune.swa=true"],
    ):
        cfg = compose(overrides)
        check_train_config(cfg)
        if not overrides or overrides == ["+experiment=quickstart"]:
            assert cfg.trainer.ema is False and cfg.finetune.swa is False


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["trainer.ema_momentum=1.0"], ["trainer.ema_momentum=1.0", "< 1", "e.g. 0.99"]),
        (["trainer.ema_momentum=0"], ["trainer.ema_momentum=0", "> 0"]),
        (["finetune.swa_epochs=1"], ["finetune.swa_epochs=1", ">= 2", "e.g. 5"]),
        (["trainer.ema=yes"], ["trainer.ema='yes'"]),
        (["trainer.ema=true", "finetune.swa=true"], ["average the weights twice", "finetune.swa=false"]),
        (["trainer.ema=true", "head.precise_bn_images=0"], ["trainer.ema=true", "head.precise_bn_images"]),
        (["finetune.swa=true", "head.precise_bn_images=0"], ["finetune.swa=true", "head.precise_bn_images"]),
    ],
)
def test_bad_weight_averaging_values_are_one_line_errors(overrides, fragments):
    with pytest.raises(UserError) as err:
        check_train_config(compose([*TINY, *overrides]))
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_averaging_without_head_batchnorm_needs_no_precise_bn():
    """Nothing to recompute: a head without BatchNorm may average with precise BN off."""
    check_train_config(
        compose([*TINY, "trainer.ema=true", "head.batchnorm=false", "head.precise_bn_images=0"])
    )


def test_the_optimizer_keeps_a_moving_average_only_when_asked():
    from bloodcell.models.finetune import optimizer
    from bloodcell.training.phases import Phase

    assert optimizer(1e-3, 10, 0.9).use_ema is False
    averaged = optimizer(1e-3, 10, 0.9, ema_momentum=0.95)
    assert averaged.use_ema is True and averaged.ema_momentum == pytest.approx(0.95)
    settings = check_train_config(compose([*TINY, "trainer.ema=true", "trainer.ema_momentum=0.9"]))
    first, second = Phase.first(settings.trainer), Phase.second(settings.finetune, settings.trainer)
    assert first.ema_momentum == second.ema_momentum == pytest.approx(0.9)
    plain = check_train_config(compose(TINY))
    assert Phase.second(plain.finetune, plain.trainer).ema_momentum is None
