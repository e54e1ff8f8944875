"""Unfreezing makes exactly the intended backbone layers trainable."""

from __future__ import annotations

import pytest

from bloodcell.models import BACKBONE_LAYER, build_model, layer_blocks
from bloodcell.models.finetune import layers_to_unfreeze, unfreeze
from tests.helpers import model_config as config


def trainable_names(backbone):
    return {layer.name for layer in backbone.layers if layer.trainable and layer.weights}


@pytest.mark.parametrize(
    "name, kwargs, top_blocks",
    [
        ("mobilenet", {"alpha": 0.25}, ["12", "13"]),
        ("small_cnn", {"filters": [8, 8, 8]}, ["conv_block2", "conv_block3"]),
        ("efficientnetb0", {}, ["block6d", "block7a"]),
        ("efficientnet_lite0", {}, ["block6d", "block7a"]),
    ],
)
def test_unfreeze_blocks_trains_exactly_the_top_blocks_without_batchnorm(name, kwargs, top_blocks):
    cfg = config(name, blocks=2, bn=True, **kwargs)
    backbone = build_model(cfg, (32, 32, 3)).get_layer(BACKBONE_LAYER)
    backbone.trainable = False
    blocks = dict(layer_blocks(backbone, name))
    assert list(blocks)[-2:] == top_blocks
    unfreeze(backbone, cfg)
    expected = {
        layer.name
        for block in top_blocks
        for layer in blocks[block]
        if layer.weights and "BatchNormalization" not in type(layer).__name__
    }
    assert trainable_names(backbone) == expected
    assert expected  # something is unfrozen
    assert all(
        not layer.trainable for layer in backbone.layers if type(layer).__name__ == "BatchNormalization"
    )


def test_efficientnet_top_conv_belongs_to_the_last_block():
    cfg = config("efficientnetb0", blocks=1, bn=False)
    backbone = build_model(cfg, (32, 32, 3)).get_layer(BACKBONE_LAYER)
    names = {layer.name for layer in layers_to_unfreeze(backbone, cfg)}
    assert {"block7a_project_conv", "top_conv", "top_bn"} <= names
    assert not any(n.startswith("block6") for n in names)


def test_unfreeze_layers_counts_layers_from_the_top_like_the_seed_notebook():
    cfg = config("mobilenet", layers=6, bn=False, alpha=0.25)
    backbone = build_model(cfg, (32, 32, 3)).get_layer(BACKBONE_LAYER)
    chosen = layers_to_unfreeze(backbone, cfg)
    assert chosen == backbone.layers[-6:]
    unfreeze(backbone, cfg)
    assert {layer.name for layer in backbone.layers if layer.trainable} == {
        layer.name for layer in backbone.layers[-6:]
    }


def test_zero_and_all_blocks():
    cfg = config("small_cnn", blocks=0, filters=[8, 8])
    backbone = build_model(cfg, (32, 32, 3)).get_layer(BACKBONE_LAYER)
    assert layers_to_unfreeze(backbone, cfg) == []
    cfg.finetune.unfreeze_blocks = -1
    assert len(layers_to_unfreeze(backbone, cfg)) == len(backbone.layers)


def test_no_precise_batchnorm_without_head_batchnorm():
    import numpy as np

    from bloodcell.training.callbacks import PreciseBatchNorm

    cfg = config("small_cnn", filters=[8])
    cfg.head.batchnorm = False
    model = build_model(cfg, (32, 32, 3))
    assert PreciseBatchNorm.for_model(model, np.zeros((4, 32, 32, 3), np.uint8), 4, 0, 4) is None
