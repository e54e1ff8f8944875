"""Augmentation pipelines built from Keras 3 core and KerasCV layers, scaled by one ``strength`` knob.

A pipeline is described by a config in ``conf/augmentation/`` (see there for every parameter):

    name: heavy
    strength: 0.5           # 0 = identity, 1 = the magnitudes written in the file
    where: pipeline         # or `model` (the lead's train code reads it)
    layers:                 # applied in this order to every training batch
      rotation: {factor: 0.7}
      ...
    one_of:                 # optional: ONE of these per batch, chosen at random ...
      randaugment: {factor: 0.5}
      grid_mask: {ratio: 0.4}
    one_of_rate: 0.5        # ... applied to this fraction of the images of that batch
    mixer:                  # optional batch-level label mixing (see build_mixer)
      kind: mixup
      alpha: 0.4

Each key under ``layers`` / ``one_of`` names an op in ``OPS`` (or give ``type: <op>`` to use the same op
twice under two keys); its parameters are the magnitudes at strength 1 and are multiplied by ``strength``.
Setting a key to null drops that layer (``augmentation.layers.zoom=null``).

Public API:

* ``build_augmentation(aug_cfg, seed)`` -> a Keras layer mapping a batch (B, H, W, 3) of uint8 or float
  pixels in [0, 255] to float32 pixels in [0, 255], or None when there is nothing to do.
* ``build_mixer(aug_cfg, num_classes, seed)`` -> ``mix(images, onehot) -> (images, soft_labels)``, or None.
* ``preview_grid(images_uint8, aug_layer, views, seed)`` -> a uint8 image of originals + augmented views
  (``python -m bloodcell.augment_preview`` writes it as a PNG; train logs it to MLflow).
* ``OPS``: the op names a config may use, each with how it reads its parameters.
* the layers: ``AugmentationPipeline``, ``RandomChoice``, ``RandomAffine``, ``CellRandAugment``,
  ``SeededAugMix``.

Modules: ``pipeline`` (config -> pipeline), ``ops`` (the op table), ``layers`` (bloodcell's own layers),
``geometry`` (fused geometry and its XLA sampler), ``mix`` (MixUp / CutMix), ``preview`` (the grid).
Importing this package does not import Keras: ``ops``, ``layers`` and ``geometry`` do, and load when a
pipeline is built or one of their names is first read from here.

Speed (CPU): TF's projective-transform kernel is most of the cost of geometric augmentation, so with
``fuse_geometry: true`` (the shipped default) flip, rotation, translation and zoom are one resampling
(``RandomAffine``), done in the tf.data map by an XLA-compiled bilinear sampler (same output as Keras'
``affine_transform``); RandAugment runs only the op it draws. See benchmarks/augment_throughput.py.

Reproducibility: Keras core layers draw from their own seeded state, so a pipeline built with the same
``seed`` gives the same views when its tf.data map runs sequentially (``num_parallel_calls=None``; a
parallel map hands the shared random state to batches in whatever order its threads run). KerasCV's
layers (grid_mask, cutout, channel_shuffle) also depend on TF's global seed: call
``keras.utils.set_random_seed(seed)`` first, as train does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bloodcell.augment.mix import LabelMixer, build_mixer
from bloodcell.augment.pipeline import build_augmentation
from bloodcell.augment.pixels import VALUE_RANGE
from bloodcell.augment.preview import MIN_TILE, PAD, preview_grid

if TYPE_CHECKING:
    from bloodcell.augment.geometry import AFFINE_OPS, RandomAffine
    from bloodcell.augment.layers import (
        OFF_STAIN_OPS,
        RANDAUGMENT_OPS,
        AugmentationPipeline,
        CellRandAugment,
        RandomChoice,
        SeededAugMix,
    )
    from bloodcell.augment.ops import OPS, Op

#: names read from the Keras-importing submodules on first access (PEP 562), not at import
_LAZY = {
    "OPS": "ops",
    "Op": "ops",
    "RANDAUGMENT_OPS": "layers",
    "OFF_STAIN_OPS": "layers",
    "AugmentationPipeline": "layers",
    "RandomChoice": "layers",
    "CellRandAugment": "layers",
    "SeededAugMix": "layers",
    "AFFINE_OPS": "geometry",
    "RandomAffine": "geometry",
}

__all__ = [
    "AFFINE_OPS",
    "MIN_TILE",
    "OFF_STAIN_OPS",
    "OPS",
    "PAD",
    "RANDAUGMENT_OPS",
    "VALUE_RANGE",
    "AugmentationPipeline",
    "CellRandAugment",
    "LabelMixer",
    "Op",
    "RandomAffine",
    "RandomChoice",
    "SeededAugMix",
    "build_augmentation",
    "build_mixer",
    "preview_grid",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
