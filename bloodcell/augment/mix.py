"""Batch-level label mixing (MixUp or CutMix, Keras core layers), configured by ``augmentation.mixer``."""

from __future__ import annotations

from typing import Any

from bloodcell.augment.pipeline import settings_of, strength_of
from bloodcell.augment.pixels import VALUE_RANGE
from bloodcell.core.errors import UserError


class LabelMixer:
    """``mixer(images, onehot) -> (images, soft_labels)`` around a Keras MixUp / CutMix ``layer``:
    float32 images in [0, 255] and float32 soft labels whose rows sum to 1."""

    def __init__(self, layer: Any, kind: str) -> None:
        self.layer = layer  # for inspection (tests, preview)
        self.kind = kind

    def __call__(self, images: Any, onehot_labels: Any) -> tuple[Any, Any]:
        from keras import ops

        out = self.layer(
            {"images": ops.cast(images, "float32"), "labels": ops.cast(onehot_labels, "float32")},
            training=True,
        )
        return ops.clip(ops.cast(out["images"], "float32"), *VALUE_RANGE), ops.cast(out["labels"], "float32")


def build_mixer(aug_cfg: Any, num_classes: int, seed: int) -> LabelMixer | None:
    """The batch-level label mixer of ``aug_cfg.mixer`` (MixUp or CutMix, Keras core), or None.

    Returns ``mix(images, onehot) -> (images, soft_labels)`` for batches of float or uint8 pixels in
    [0, 255] and one-hot (B, num_classes) labels: float32 images in [0, 255] and float32 soft labels
    whose rows sum to 1. Apply it after ``build_augmentation``'s layer, on training batches only.

    ``mixer.kind: mixup`` mixes whole images with weights ~ Beta(alpha * strength, alpha * strength):
    small alpha keeps most images close to one source. ``mixer.kind: cutmix`` pastes a box of another
    image, box area ~ Beta(a, a) with a ~ U(0, factor * strength). Labels are mixed by pixel share.
    """
    aug = settings_of(aug_cfg)
    spec = aug.mixer
    if not spec:
        return None
    strength = strength_of(aug)
    kind = spec.kind
    if strength == 0.0:
        return None
    import keras

    if kind == "mixup":
        alpha = float(spec.alpha) * strength
        layer = keras.layers.MixUp(alpha=alpha, seed=int(seed) + 99)
    elif kind == "cutmix":
        factor = min(float(spec.factor) * strength, 1.0)
        layer = keras.layers.CutMix(factor=factor, seed=int(seed) + 99)
    else:
        raise UserError(f"unknown augmentation.mixer.kind '{kind}'; use mixup or cutmix")
    if num_classes < 2:
        raise UserError(f"a label mixer needs at least 2 classes, got num_classes={num_classes}")
    return LabelMixer(layer, kind)
