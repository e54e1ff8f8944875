"""Read a conf/augmentation node and assemble the training-batch pipeline from its sections."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bloodcell.core.errors import UserError
from bloodcell.core.settings import AugmentationSchema

if TYPE_CHECKING:
    from bloodcell.augment.layers import AugmentationPipeline


def settings_of(cfg: Any) -> AugmentationSchema:
    """The ``augmentation`` settings, or a mapping of them (an OmegaConf node, a dict, None: nothing set)
    with the schema's defaults for what it leaves out (`AugmentationSchema.of`), so that tests and the
    library may hand either."""
    if cfg is not None and not isinstance(cfg, (Mapping, AugmentationSchema)):
        from omegaconf import DictConfig

        if not isinstance(cfg, DictConfig):
            raise UserError(
                f"augmentation config must be a mapping, got {type(cfg).__name__}; check conf/augmentation/"
            )
    return AugmentationSchema.of(cfg)


def strength_of(aug: AugmentationSchema) -> float:
    """``augmentation.strength``, checked to lie in [0, 1] (a mapping made by code is not checked else)."""
    strength = float(aug.strength)
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"augmentation.strength={strength} is outside [0, 1]; pick a value between 0 and 1")
    return strength


def build_augmentation(aug_cfg: Any, seed: int) -> AugmentationPipeline | None:
    """The training-batch augmentation described by ``aug_cfg``: the ``augmentation`` settings, or a
    mapping of them (a conf/augmentation/*.yaml node, a dict: `settings_of`).

    Returns a Keras layer taking (B, H, W, 3) uint8 or float pixels in [0, 255] and returning float32
    pixels in [0, 255] of the same shape, or None when the pipeline does nothing (``none``, strength 0,
    or every layer dropped). Call it with ``training=True``.
    """
    aug = settings_of(aug_cfg)
    strength = strength_of(aug)
    if strength == 0.0:
        return None  # before any Keras import: `none` and strength 0 stay cheap
    from bloodcell.augment.geometry import AFFINE_OPS, fused_geometry
    from bloodcell.augment.layers import AugmentationPipeline, RandomChoice
    from bloodcell.augment.ops import build_ops, op_of

    seed = int(seed)
    layers_spec = dict(aug.layers or {})
    # In the tf.data map the fused geometry uses the XLA sampler; inside a model (where=model, maybe on
    # a GPU) Keras' own affine_transform.
    sampler = "keras" if aug.where == "model" else "xla"
    fused = fused_geometry(layers_spec, strength, seed, sampler) if aug.fuse_geometry else None
    if fused is not None:
        layers_spec = {k: v for k, v in layers_spec.items() if op_of(k, v) not in AFFINE_OPS}
    stages = ([fused] if fused is not None else []) + build_ops(layers_spec, strength, seed, "layers")
    choices = build_ops(aug.one_of or {}, strength, seed + 7, "one_of")
    rate = float(aug.one_of_rate)
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"augmentation.one_of_rate={rate} is outside [0, 1]; pick a fraction of images")
    if choices and rate > 0.0:
        stages.append(RandomChoice(choices, rate=rate, seed=seed + 11, name="one_of"))
    if not stages:
        return None
    layer = AugmentationPipeline(stages, seed=seed, name=f"augment_{aug.name}")
    layer.aug_config = aug  # lets preview_grid rebuild an independent copy under another seed
    return layer
