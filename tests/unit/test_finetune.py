"""Unfreezing makes exactly the intended backbone layers trainable."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from bloodcell.finetune import layers_to_unfreeze, unfreeze
from bloodcell.models import BACKBONE_LAYER, build_model, layer_blocks


def config(name, weights=None, blocks=2, layers=None, bn="auto", **backbone_kw):
    return OmegaConf.create(
        {
            "backbone": {"name": name, "weights": weights, "input_size": 32, "kwargs": backbone_kw},
            "head": {"units": [16], "dropout": [0.1], "batchnorm": True, "leaky_relu_slope": 0.05},
            "finetune": {"unfreeze_blocks": blocks, "unfreeze_layers": layers, "freeze_batchnorm": bn},
        }
    )


def trainable_names(backbone):
    return {layer.name for layer in backbone.layers if layer.trainable and layer.weights}


@pytest.mark.parametrize(
    "name, kwargs, top_blocks",
    [
        ("mobilenet", {"alpha": 0.25}, ["12", "13"]),
        ("small_cnn", {"filters": [8, 8, 8]}, ["conv_block2", "conv_block3"]),
        ("efficientnetb0", {}, ["block6d", "block7a"]),
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


def test_precise_batchnorm_sets_head_statistics_from_clean_images_before_each_validation():
    """Trained on shifted ("augmented") images, validated after the head's BatchNorm statistics were
    recomputed from the clean images: the moving averages equal the clean features' mean and variance,
    which the plain momentum update (on shifted batches) does not give."""
    import keras
    import numpy as np

    from bloodcell.callbacks import PreciseBatchNorm

    cfg = config("small_cnn", filters=[8, 8], bn=True)
    cfg.head.units, cfg.head.dropout = [16, 8], [0.2, 0.1]
    model = build_model(cfg, (32, 32, 3))
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 120, (64, 32, 32, 3)).astype(np.uint8)
    labels = keras.utils.to_categorical(rng.integers(0, 8, 64), 8)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    callback = PreciseBatchNorm.for_model(model, clean, count=len(clean), seed=0, batch_size=16)
    assert callback is not None
    seen = []

    class Probe(keras.callbacks.Callback):  # what the moving mean is while validation runs
        def on_test_batch_begin(self, batch, logs=None):
            seen.append(model.get_layer("head_bn2").moving_mean.numpy())

    model.fit(
        clean.astype(np.float32) + 100.0,
        labels,
        validation_data=(clean.astype(np.float32), labels),
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[callback, Probe()],
    )
    for name in ("head_bn1", "head_bn2"):
        norm = model.get_layer(name)
        features = keras.Model(model.inputs, norm.input).predict(clean.astype(np.float32), verbose=0)
        np.testing.assert_allclose(norm.moving_mean, features.mean(0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(norm.moving_variance, features.var(0), rtol=1e-3, atol=1e-4)
    assert seen and np.allclose(seen[-1], model.get_layer("head_bn2").moving_mean)
    # without the callback the statistics follow the shifted training batches instead
    plain = build_model(cfg, (32, 32, 3))
    plain.set_weights(model.get_weights())
    plain.compile(optimizer="adam", loss="categorical_crossentropy")
    plain.fit(clean.astype(np.float32) + 100.0, labels, batch_size=16, epochs=1, verbose=0)
    norm = plain.get_layer("head_bn1")
    features = keras.Model(plain.inputs, norm.input).predict(clean.astype(np.float32), verbose=0)
    assert not np.allclose(norm.moving_mean, features.mean(0), rtol=1e-2, atol=1e-2)


def test_no_precise_batchnorm_without_head_batchnorm():
    import numpy as np

    from bloodcell.callbacks import PreciseBatchNorm

    cfg = config("small_cnn", filters=[8])
    cfg.head.batchnorm = False
    model = build_model(cfg, (32, 32, 3))
    assert PreciseBatchNorm.for_model(model, np.zeros((4, 32, 32, 3), np.uint8), 4, 0, 4) is None
