"""Phase 2 policy (config group ``finetune``): which backbone layers to unfreeze, the BatchNorm policy,
and the fine-tuning optimizer with its schedule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bloodcell.core.errors import UserError
from bloodcell.core.settings import TrainSchema
from bloodcell.models import batchnorm_frozen, layer_blocks, resolve_auto

if TYPE_CHECKING:
    import keras


def freeze_backbone_in_phase1(settings: TrainSchema | Any) -> bool:
    """Resolve ``trainer.freeze_backbone`` (``auto``: frozen with pretrained weights)."""
    settings = TrainSchema.of(settings)
    return resolve_auto(settings.trainer.freeze_backbone, settings.backbone)


def _is_batchnorm(layer: keras.Layer) -> bool:
    from keras import layers

    return isinstance(layer, layers.BatchNormalization)


def set_backbone_trainable(backbone: keras.Model, trainable: bool, *, keep_batchnorm_frozen: bool) -> None:
    backbone.trainable = True  # a nested model only honours per-layer flags when it is trainable itself
    for layer in backbone.layers:
        layer.trainable = trainable and not (keep_batchnorm_frozen and _is_batchnorm(layer))
    if not trainable:
        backbone.trainable = False


def layers_to_unfreeze(backbone: keras.Model, settings: TrainSchema | Any) -> list[keras.Layer]:
    """The backbone layers phase 2 trains: the top ``finetune.unfreeze_layers`` layers if set (the seed
    notebook's way), else every layer of the top ``finetune.unfreeze_blocks`` blocks (-1 = all). Reads the
    ``finetune`` and ``backbone`` settings (or a mapping of them: `TrainSchema.of`)."""
    settings = TrainSchema.of(settings)
    ft = settings.finetune
    if ft.unfreeze_layers is not None:
        count = int(ft.unfreeze_layers)
        if count < 0:
            raise UserError(f"finetune.unfreeze_layers={count} must be >= 0 (or null to use unfreeze_blocks)")
        return list(backbone.layers[len(backbone.layers) - count :]) if count else []
    blocks = layer_blocks(backbone, settings.backbone.name)
    count = int(ft.unfreeze_blocks)
    if count < -1:
        raise UserError(f"finetune.unfreeze_blocks={count} must be >= 0, or -1 for the whole backbone")
    if count == -1 or count >= len(blocks):
        chosen = blocks
    else:
        chosen = blocks[len(blocks) - count :] if count else []
    return [layer for _, block in chosen for layer in block]


def unfreeze(backbone: keras.Model, settings: TrainSchema | Any) -> int:
    """Make exactly the chosen layers trainable (BatchNorm stays frozen per policy); returns how many
    layers are trainable afterwards."""
    settings = TrainSchema.of(settings)
    chosen = {id(layer) for layer in layers_to_unfreeze(backbone, settings)}
    keep_bn = batchnorm_frozen(settings)
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = id(layer) in chosen and not (keep_bn and _is_batchnorm(layer))
    return sum(layer.trainable for layer in backbone.layers if layer.weights)


def optimizer(
    lr: float, decay_steps: int, decay_rate: float, ema_momentum: float | None = None
) -> keras.optimizers.Optimizer:
    """Adam on an exponentially decaying learning rate (the reference recipe's schedule). With
    ``ema_momentum`` it also keeps an exponential moving average of the trainable weights after every
    step (Keras' ``use_ema``; ``trainer.ema``): the averages are optimizer variables, so a checkpoint
    keeps them."""
    import keras

    schedule = keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=decay_steps, decay_rate=decay_rate)
    if ema_momentum is None:
        return keras.optimizers.Adam(learning_rate=schedule)
    return keras.optimizers.Adam(learning_rate=schedule, use_ema=True, ema_momentum=ema_momentum)
