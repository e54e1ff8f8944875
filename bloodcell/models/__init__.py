"""Models: backbone (config group ``backbone``) + head (``head``), with resizing and preprocessing inside
the model so it takes raw 0-255 pixels of any size and can be loaded with plain Keras."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bloodcell.core.settings import BackboneSchema, TrainSchema
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


def resolve_auto(policy: Any, backbone: BackboneSchema) -> bool:
    """A freeze policy (``trainer.freeze_backbone``, ``finetune.freeze_batchnorm``) as a yes/no: ``auto``
    means yes when the backbone starts from pretrained weights, which a small data set would only spoil,
    and no for a randomly initialised one, which has nothing to protect."""
    return backbone.weights is not None if policy == "auto" else bool(policy)


def batchnorm_frozen(settings: TrainSchema | Any) -> bool:
    """Whether the backbone's BatchNorm keeps its statistics in every phase (``finetune.freeze_batchnorm``).
    Decided here, not in finetune, because the model is built around it (see `build_model`)."""
    settings = TrainSchema.of(settings)
    return resolve_auto(settings.finetune.freeze_batchnorm, settings.backbone)


def build_model(settings: TrainSchema | Any, input_shape: tuple[int, ...]) -> keras.Model:
    """Input (H, W, 3) float pixels 0-255 -> resize -> backbone preprocessing -> backbone -> head, as the
    run's settings say (their ``backbone``, ``head`` and ``finetune`` groups; or a mapping of them, as a
    test or benchmark writes it: `TrainSchema.of`).

    The backbone is one nested layer named "backbone"; when its BatchNorm is frozen it is called with
    training=False, so fine-tuning never updates the ImageNet statistics (Keras transfer-learning guide).
    """
    import keras
    from keras import layers

    from bloodcell.models.backbones import preprocessing_layers

    settings = TrainSchema.of(settings)
    backbone = build_backbone(settings.backbone)
    backbone.name = BACKBONE_LAYER  # one stable name whatever the family: finetune finds it by this
    size = input_size(settings.backbone)
    inputs = keras.Input(tuple(input_shape), name="image")
    x = inputs
    if tuple(input_shape[:2]) != (size, size):
        x = layers.Resizing(size, size, name="resize")(x)
    for layer in preprocessing_layers(settings.backbone.name):
        x = layer(x)
    x = backbone(x, training=False if batchnorm_frozen(settings) else None)
    outputs = build_head(x, settings.head)
    return keras.Model(inputs, outputs, name=f"bloodcell_{settings.backbone.name}")
