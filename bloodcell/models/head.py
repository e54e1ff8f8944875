"""The classification head: a dense stack on pooled backbone features (config group ``head``)."""

from __future__ import annotations

from typing import Any

from bloodcell import NUM_CLASSES
from bloodcell.core.settings import HeadSchema


def build_head(features: Any, head_cfg: HeadSchema | Any) -> Any:
    """Dense -> BatchNorm -> LeakyReLU -> Dropout per entry of ``head.units``, then the softmax (the
    ``head`` settings, or a mapping of them: `HeadSchema.of`). The output layer computes in float32 so mixed
    precision keeps a stable softmax."""
    from keras import layers

    head = HeadSchema.of(head_cfg)
    units, dropout = list(head.units), list(head.dropout)
    if len(dropout) != len(units):
        dropout = (dropout + [dropout[-1] if dropout else 0.0] * len(units))[: len(units)]
    x = features
    for i, (width, rate) in enumerate(zip(units, dropout), start=1):
        x = layers.Dense(width, use_bias=not head.batchnorm, name=f"head_dense{i}")(x)
        if head.batchnorm:
            x = layers.BatchNormalization(momentum=head.batchnorm_momentum, name=f"head_bn{i}")(x)
        x = layers.LeakyReLU(negative_slope=head.leaky_relu_slope, name=f"head_act{i}")(x)
        if rate:
            x = layers.Dropout(rate, name=f"head_dropout{i}")(x)
    return layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)
