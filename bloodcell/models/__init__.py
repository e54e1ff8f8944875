"""Models: backbone (config group ``backbone``) + head (``head``), with resizing and preprocessing inside
the model so it takes raw 0-255 pixels of any size and can be loaded with plain Keras."""

from __future__ import annotations

from bloodcell.models.backbones import BACKBONES, build_backbone, get_spec, input_size, layer_blocks
from bloodcell.models.head import build_head

__all__ = [
    "BACKBONES",
    "build_model",
    "build_backbone",
    "build_head",
    "get_spec",
    "layer_blocks",
    "pretrained",
    "BACKBONE_LAYER",
]

BACKBONE_LAYER = "backbone"


def pretrained(backbone_cfg) -> bool:
    return backbone_cfg.weights is not None


def build_model(cfg, input_shape):
    """Input (H, W, 3) float pixels 0-255 -> resize -> backbone preprocessing -> backbone -> head.

    The backbone is one nested layer named "backbone"; when its BatchNorm is frozen it is called with
    training=False, so fine-tuning never updates the ImageNet statistics (Keras transfer-learning guide).
    """
    import keras
    from keras import layers

    from bloodcell.finetune import freeze_batchnorm
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
    x = backbone(x, training=False if freeze_batchnorm(cfg) else None)
    outputs = build_head(x, cfg.head)
    return keras.Model(inputs, outputs, name=f"bloodcell_{cfg.backbone.name}")
