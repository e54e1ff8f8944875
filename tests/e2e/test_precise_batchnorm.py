"""Precise BN in a real (tiny) Keras fit: the head's BatchNorm statistics are what validation sees. It trains,
so it sits with the end-to-end tests rather than in tests/unit."""

from __future__ import annotations

from bloodcell.models import build_model
from tests.helpers import model_config as config


def test_precise_batchnorm_sets_head_statistics_from_clean_images_before_each_validation():
    """Trained on shifted ("augmented") images, validated after the head's BatchNorm statistics were
    recomputed from the clean images: the moving averages equal the clean features' mean and variance,
    which the plain momentum update (on shifted batches) does not give."""
    import keras
    import numpy as np

    from bloodcell.training.callbacks import PreciseBatchNorm

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
