"""The classification head: a dense stack on pooled backbone features (config group ``head``)."""

from __future__ import annotations

from bloodcell import NUM_CLASSES


def build_head(features, head_cfg):
    """Dense -> BatchNorm -> LeakyReLU -> Dropout per entry of ``head_cfg.units``, then the softmax.
    The output layer computes in float32 so mixed precision keeps a stable softmax."""
    from keras import layers

    units, dropout = list(head_cfg.units), list(head_cfg.dropout)
    if len(dropout) != len(units):
        dropout = (dropout + [dropout[-1] if dropout else 0.0] * len(units))[: len(units)]
    x = features
    for i, (width, rate) in enumerate(zip(units, dropout), start=1):
        x = layers.Dense(width, use_bias=not head_cfg.batchnorm, name=f"head_dense{i}")(x)
        if head_cfg.batchnorm:
            x = layers.BatchNormalization(
                momentum=head_cfg.get("batchnorm_momentum", 0.99), name=f"head_bn{i}"
            )(x)
        x = layers.LeakyReLU(negative_slope=head_cfg.leaky_relu_slope, name=f"head_act{i}")(x)
        if rate:
            x = layers.Dropout(rate, name=f"head_dropout{i}")(x)
    return layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)


def precise_batchnorm_callback(model, train_images, count: int, seed: int, batch_size: int):
    """A Keras callback that, before every validation, recomputes the statistics of the head's BatchNorm
    layers from ``count`` clean (un-augmented) training images, a fixed seeded sample of ``train_images``
    ("precise BN", Wu & Johnson, *Rethinking
    'Batch' in BatchNorm*, 2021). During training those layers normalise augmented batches, and their moving
    averages lag weights that change every step; at inference they meet clean images. On real cells
    (mobilenet_cpu) that mismatch cost 0.7 accuracy points and made validation accuracy swing by several
    points from one epoch to the next. The backbone's BatchNorm is left alone (frozen ImageNet statistics,
    or trained with the backbone). Returns None when the head has no BatchNorm or ``count`` is 0."""
    import keras
    import numpy as np
    import tensorflow as tf

    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    sample = np.sort(np.random.default_rng(seed).permutation(len(train_images))[: max(int(count), 0)])
    if not norms or len(sample) == 0:
        return None
    images = train_images[sample]
    # one pass through the backbone up to the first BatchNorm, then only the small head parts in between
    parts = [keras.Model(model.inputs, norms[0].input)] + [
        keras.Model(before.input, after.input) for before, after in zip(norms, norms[1:])
    ]
    batches = (
        tf.data.Dataset.from_tensor_slices(images).batch(batch_size).map(lambda x: tf.cast(x, tf.float32))
    )

    class PreciseBatchNorm(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            x = parts[0].predict(batches, verbose=0)
            for i, norm in enumerate(norms):
                if i:
                    x = parts[i].predict(x, batch_size=batch_size, verbose=0)
                x64 = x.astype(np.float64)
                norm.moving_mean.assign(x64.mean(axis=0).astype(np.float32))
                norm.moving_variance.assign(x64.var(axis=0).astype(np.float32))

    return PreciseBatchNorm()
