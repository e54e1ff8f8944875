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

Two public builders:

* ``build_augmentation(aug_cfg, seed)`` -> a Keras layer mapping a batch (B, H, W, 3) of uint8 or float
  pixels in [0, 255] to float32 pixels in [0, 255], or None when there is nothing to do.
* ``build_mixer(aug_cfg, num_classes, seed)`` -> ``mix(images, onehot) -> (images, soft_labels)``, or None.

Both are reproducible under ``seed`` when the tf.data map runs sequentially (parallel maps draw random
numbers from a shared state in whatever order the threads run).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from bloodcell.errors import UserError

VALUE_RANGE = (0.0, 255.0)


def _cfg_to_dict(cfg: Any) -> dict:
    """OmegaConf node / mapping / None -> plain dict (so tests and the library accept either)."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise UserError(f"augmentation config must be a mapping, got {type(cfg).__name__}; check conf/augmentation/")


def _strength(aug: dict) -> float:
    strength = float(aug.get("strength", 1.0) if aug.get("strength") is not None else 0.0)
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"augmentation.strength={strength} is outside [0, 1]; pick a value between 0 and 1")
    return strength


# --------------------------------------------------------------------------------------------------
# Op builders: (params at strength 1, strength, seed) -> keras layer, or None when it would be a no-op.
# --------------------------------------------------------------------------------------------------


def _flip(p: dict, s: float, seed: int):
    import keras

    # A flip has no magnitude; cells have no orientation, so it is on whenever anything is.
    return keras.layers.RandomFlip(p.get("mode", "horizontal"), seed=seed) if s > 0 else None


def _rotation(p: dict, s: float, seed: int):
    import keras

    f = float(p.get("factor", 0.7)) * s
    if f <= 0:
        return None
    return keras.layers.RandomRotation(f, fill_mode=p.get("fill_mode", "reflect"), seed=seed)


def _brightness(p: dict, s: float, seed: int):
    import keras

    f = float(p.get("factor", 0.2)) * s
    if f <= 0:
        return None
    return keras.layers.RandomBrightness(f, value_range=VALUE_RANGE, seed=seed)


def _contrast(p: dict, s: float, seed: int):
    import keras

    f = float(p.get("factor", 0.2)) * s
    if f <= 0:
        return None
    return keras.layers.RandomContrast(f, value_range=VALUE_RANGE, seed=seed)


def _translation(p: dict, s: float, seed: int):
    import keras

    f = float(p.get("factor", 0.15)) * s
    if f <= 0:
        return None
    return keras.layers.RandomTranslation(f, f, fill_mode=p.get("fill_mode", "reflect"), seed=seed)


def _zoom(p: dict, s: float, seed: int):
    import keras

    f = float(p.get("factor", 0.3)) * s
    if f <= 0:
        return None
    return keras.layers.RandomZoom(f, fill_mode=p.get("fill_mode", "reflect"), seed=seed)


#: op name -> builder. Each builder documents its parameters by the keys it reads (defaults = strength 1).
OPS: dict[str, Callable[[dict, float, int], Any]] = {
    "flip": _flip,
    "rotation": _rotation,
    "brightness": _brightness,
    "contrast": _contrast,
    "translation": _translation,
    "zoom": _zoom,
}


def _build_ops(spec: dict, strength: float, seed: int, where: str) -> list:
    """Build the layers of one section (``layers`` or ``one_of``), in file order."""
    built = []
    for i, (key, params) in enumerate(spec.items()):
        if params is None or params is False:
            continue  # dropped from the command line: augmentation.layers.<key>=null
        params = dict(params) if isinstance(params, Mapping) else {}
        op = params.pop("type", key)
        if op not in OPS:
            raise UserError(
                f"unknown augmentation op '{op}' in augmentation.{where}.{key}; known ops: {', '.join(sorted(OPS))}"
            )
        try:
            layer = OPS[op](params, strength, seed + 1000 * (i + 1))
        except (TypeError, ValueError) as err:
            raise UserError(f"bad parameters for augmentation.{where}.{key}: {err}") from None
        if layer is not None:
            built.append(layer)
    return built


def _pipeline_class():
    """Defined lazily so that importing bloodcell.augment does not import Keras."""
    global _AugmentationPipeline
    if _AugmentationPipeline is not None:
        return _AugmentationPipeline
    import keras
    from keras import ops
    from keras.src.layers.preprocessing.data_layer import DataLayer

    class AugmentationPipeline(DataLayer):
        """Cast to float32, apply ``stages`` in order, then optionally ONE of ``choices`` per batch
        (to a random ``choice_rate`` fraction of its images), and clip to [0, 255].

        A DataLayer, like Keras' own preprocessing layers, so it runs inside a tf.data map and inside a
        model alike. With ``training=False`` it only casts.
        """

        def __init__(self, stages=(), choices=(), choice_rate=1.0, seed=0, **kwargs):
            super().__init__(**kwargs)
            self.stages = list(stages)
            self.choices = list(choices)
            self.choice_rate = float(choice_rate)
            self.seed = seed
            self.generator = keras.random.SeedGenerator(seed)

        def call(self, images, training=True):
            x = self.backend.cast(images, "float32")
            if not training:
                return x
            for layer in self.stages:
                x = self.backend.cast(layer(x, training=True), "float32")
            if self.choices:
                x = self._apply_one_of(x)
            return self.backend.numpy.clip(x, VALUE_RANGE[0], VALUE_RANGE[1])

        def _apply_one_of(self, x):
            seed = self._get_seed_generator(self.backend._backend)
            b = self.backend
            branches = [
                (lambda layer: (lambda t: b.cast(layer(t, training=True), "float32")))(layer)
                for layer in self.choices
            ]
            if len(branches) == 1:
                augmented = branches[0](x)
            else:
                index = b.random.randint((), 0, len(branches), seed=seed)
                augmented = b.core.switch(index, branches, x)
            if self.choice_rate >= 1.0:
                return augmented
            batch = b.shape(x)[0]
            keep = b.random.uniform((batch, 1, 1, 1), seed=seed) < self.choice_rate
            return b.numpy.where(keep, augmented, x)

        def compute_output_shape(self, input_shape):
            return input_shape

        def compute_output_spec(self, inputs, training=True):
            return keras.KerasTensor(inputs.shape, dtype="float32")

    _AugmentationPipeline = AugmentationPipeline
    return AugmentationPipeline


_AugmentationPipeline = None


def build_augmentation(aug_cfg: Any, seed: int):
    """The training-batch augmentation described by ``aug_cfg`` (a conf/augmentation/*.yaml node).

    Returns a Keras layer taking (B, H, W, 3) uint8 or float pixels in [0, 255] and returning float32
    pixels in [0, 255] of the same shape, or None when the pipeline does nothing (``none``, strength 0,
    or every layer dropped). Call it with ``training=True``.
    """
    aug = _cfg_to_dict(aug_cfg)
    strength = _strength(aug)
    if strength == 0.0:
        return None
    stages = _build_ops(aug.get("layers") or {}, strength, int(seed), "layers")
    choices = _build_ops(aug.get("one_of") or {}, strength, int(seed) + 7, "one_of")
    rate = float(aug.get("one_of_rate", 1.0))
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"augmentation.one_of_rate={rate} is outside [0, 1]; pick a fraction of images")
    if rate == 0.0:
        choices = []
    if not stages and not choices:
        return None
    return _pipeline_class()(
        stages=stages, choices=choices, choice_rate=rate, seed=int(seed), name=f"augment_{aug.get('name', 'custom')}"
    )
