"""bloodcell's own Keras layers: the pipeline around the stages, the one-of switch, and the Keras
RandAugment / AugMix variants the ops table builds.

Importing this module imports Keras; ``bloodcell.augment`` loads it on first use only.

The pipeline and the switch are plain ``keras.layers.Layer`` subclasses computing with ``keras.ops``:
bloodcell runs Keras on TensorFlow (KerasCV needs it), so those ops run in a tf.data map as they do in a
model, which is what Keras' own preprocessing layers get from their (private) data-layer base class.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from bloodcell.augment.pixels import VALUE_RANGE

#: Keras RandAugment's ops (CellRandAugment runs only the drawn one of each slot).
RANDAUGMENT_OPS = (
    "random_shear",
    "random_translation",
    "random_rotation",
    "random_brightness",
    "random_color_degeneration",
    "random_contrast",
    "random_sharpness",
    "random_posterization",
    "solarization",
    "auto_contrast",
    "equalization",
)
#: Left out by default: solarization inverts bright pixels (pink cytoplasm turns green): no stain does that.
#: (It is also Keras 3.15's slowest op by far: ~25 images/s at 96 px in a CPU tf.data map.)
OFF_STAIN_OPS = ("solarization",)


class FloatImageLayer(keras.layers.Layer):
    """Base of the layers here: (B, H, W, C) images in, float32 images of the same shape out."""

    def called_layers(self) -> list[keras.layers.Layer]:
        """The layers this one calls; they are built with it."""
        return []

    def build(self, input_shape: tuple) -> None:
        for layer in self.called_layers():
            if not layer.built:
                layer.build(input_shape)
        self.built = True

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def compute_output_spec(self, inputs: Any, training: bool = True) -> keras.KerasTensor:
        return keras.KerasTensor(inputs.shape, dtype="float32")


def _float32_call(layer: keras.layers.Layer, images: Any) -> Any:
    return ops.cast(layer(images, training=True), "float32")


class RandomChoice(FloatImageLayer):
    """Apply ONE of ``branches`` per batch (uniformly at random; only that branch runs) to a random
    ``rate`` fraction of the batch's images; the others pass through unchanged."""

    def __init__(
        self, branches: Sequence[keras.layers.Layer], rate: float = 1.0, seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.branches = list(branches)
        self.rate = float(rate)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def called_layers(self) -> list[keras.layers.Layer]:
        return self.branches

    def call(self, images: Any, training: bool = True) -> Any:
        x = ops.cast(images, "float32")
        if not training or not self.branches:
            return x
        fns = [functools.partial(_float32_call, layer) for layer in self.branches]
        if len(fns) == 1:
            out = fns[0](x)
        else:
            out = ops.switch(keras.random.randint((), 0, len(fns), seed=self.generator), fns, x)
        if self.rate >= 1.0:
            return out
        keep = keras.random.uniform((ops.shape(x)[0], 1, 1, 1), seed=self.generator) < self.rate
        return ops.where(keep, out, x)


class AugmentationPipeline(FloatImageLayer):
    """Cast to float32, apply ``stages`` in order, clip to [0, 255]. With ``training=False`` it only
    casts. Runs inside a tf.data map and inside a model alike."""

    def __init__(self, stages: Sequence[keras.layers.Layer] = (), seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stages = list(stages)
        self.seed = seed

    def called_layers(self) -> list[keras.layers.Layer]:
        return self.stages

    def call(self, images: Any, training: bool = True) -> Any:
        x = ops.cast(images, "float32")
        if not training:
            return x
        for layer in self.stages:
            x = _float32_call(layer, x)
        return ops.clip(x, VALUE_RANGE[0], VALUE_RANGE[1])


class CellRandAugment(keras.layers.RandAugment):
    """Keras RandAugment restricted to ``ops``, running only the drawn op of each slot.

    Keras 3.15 computes every op for each of `num_ops` slots and keeps one with `where` (11x the
    work); here each slot is a `switch`, so only the chosen op runs. Same distribution otherwise:
    `num_ops` ops drawn per batch, all at magnitude `factor`."""

    def __init__(self, *args: Any, ops: Sequence[str] = RANDAUGMENT_OPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Keras reads the op list from this class attribute; an instance copy narrows it for this layer.
        self._AUGMENT_LAYERS = list(ops)

    def transform_images(self, images: Any, transformation: Any, training: bool = True) -> Any:
        b = self.backend
        images = b.cast(images, self.compute_dtype)
        if not training or transformation is None:
            return images
        transforms = transformation["transforms"]

        def branch(name: str) -> Any:
            layer = getattr(self, name)
            return lambda t: b.cast(layer.transform_images(t, transforms[name]), self.compute_dtype)

        branches = [branch(name) for name in transforms]
        for i in range(self.num_ops):
            images = b.core.switch(transformation["layer_idxes"][i], branches, images)
        return images


class SeededAugMix(keras.layers.AugMix):
    """Keras AugMix whose op chains follow ``seed``.

    Keras 3.15 draws the chains with Python's global `random` while *tracing*: inside tf.data or a
    compiled model they are frozen at trace time and not tied to `seed`. Here that draw runs on this
    layer's own generator state (swapped into the global generator for the call, then swapped back, so
    the global stream is as it was). build_augmentation puts several such copies behind a RandomChoice
    (`variants`) so that training sees several chain sets."""

    _augment_layers: list[str]  # the ops AugMix.__init__ chose; chains draw from it

    def __init__(self, *args: Any, exclude: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # AugMix has no argument to leave ops out; its chains draw from this list.
        self._augment_layers = [name for name in self._augment_layers if name not in set(exclude)]
        self._chain_rng = random.Random(kwargs.get("seed"))

    def get_random_transformation(self, data: Any, training: bool = True, seed: Any = None) -> Any:
        outside = random.getstate()
        random.setstate(self._chain_rng.getstate())
        try:
            return super().get_random_transformation(data, training=training, seed=seed)
        finally:
            self._chain_rng.setstate(random.getstate())
            random.setstate(outside)
