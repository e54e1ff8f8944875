"""Models: backbone (config group ``backbone``) + head (``head``), with resizing and preprocessing inside
the model so it takes raw 0-255 pixels of any size and can be loaded with plain Keras."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bloodcell.models.backbones import BACKBONES, build_backbone, get_spec, input_size, layer_blocks
from bloodcell.models.head import build_head

__all__ = [
    "BACKBONES",
    "build_model",
    "build_backbone",
    "build_head",
    "get_spec",
    "layer_blocks",
    "batchnorm_frozen",
    "resolve_auto",
    "BACKBONE_LAYER",
]

if TYPE_CHECKING:
    import keras

BACKBONE_LAYER = "backbone"


def resolve_auto(policy: Any, backbone_cfg: Any) -> bool:
    """A freeze policy (``trainer.freeze_backbone``, ``finetune.freeze_batchnorm``) as a yes/no: ``auto``
    means yes when the backbone starts from pretrained weights, which a small data set would only spoil,
    and no for a randomly initialised one, which has nothing to protect."""
    return backbone_cfg.weights is not None if policy == "auto" else bool(policy)


def batchnorm_frozen(cfg: Any) -> bool:
    """Whether the backbone's BatchNorm keeps its statistics in every phase (``finetune.freeze_batchnorm``).
    Decided here, not in finetune, because the model is built around it (see `build_model`)."""
    return resolve_auto(cfg.finetune.freeze_batchnorm, cfg.backbone)


def build_model(cfg: Any, input_shape: tuple[int, ...]) -> keras.Model:
    """Input (H, W, 3) float pixels 0-255 -> resize -> backbone preprocessing -> backbone -> head.

    The backbone is one nested layer named "backbone"; when its BatchNorm is frozen it is called with
    training=False, so fine-tuning never updates the ImageNet statistics (Keras transfer-learning guide).
    """
    import keras
    from keras import layers

    from bloodcell.models.backbones import preprocessing_layers

    backbone = build_backbone(cfg.backbone)
    backbone.name = BACKBONE_LAYER  # one stable name whatever the family: finetune finds it by this
    size = input_size(cfg.backbone)
    inputs = keras.Input(tuple(input_shape), name="image")
    x = inputs
    if tuple(input_shape[:2]) != (size, size):
        x = layers.Resizing(size, size, name="resize")(x)
    for layer in preprocessing_layers(cfg.backbone.name):
        x = layer(x)
    x = backbone(x, training=False if batchnorm_frozen(cfg) else None)
    outputs = build_head(x, cfg.head)
    return keras.Model(inputs, outputs, name=f"bloodcell_{cfg.backbone.name}")
