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
* ``OPS``: the op names a config may use, each with the builder that reads its parameters.

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

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from bloodcell.errors import UserError

VALUE_RANGE = (0.0, 255.0)
#: preview_grid upscales tiles (nearest neighbour) to at least this many pixels so 32 px images stay visible.
MIN_TILE = 96
#: white pixels between preview tiles
PAD = 4


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
    raise UserError(
        f"augmentation config must be a mapping, got {type(cfg).__name__}; check conf/augmentation/"
    )


def _strength(aug: dict) -> float:
    value = aug.get("strength")
    strength = 1.0 if value is None else float(value)  # absent: the magnitudes as written
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


def _hue(p: dict, s: float, seed: int):
    import keras

    # Shift of up to +-factor/2 of the colour circle (Keras' convention).
    f = float(p.get("factor", 0.1)) * s
    if f <= 0:
        return None
    return keras.layers.RandomHue((0.0, f), value_range=VALUE_RANGE, seed=seed)


def _saturation(p: dict, s: float, seed: int):
    import keras

    # Keras: 0.5 keeps the image, 0 is grey, 1 fully saturated; sample within 0.5 +- factor.
    f = min(float(p.get("factor", 0.2)) * s, 0.5)
    if f <= 0:
        return None
    return keras.layers.RandomSaturation((0.5 - f, 0.5 + f), value_range=VALUE_RANGE, seed=seed)


def _color_jitter(p: dict, s: float, seed: int):
    """Stain-like colour variation: brightness, contrast, saturation (0.5 +- value) and hue."""
    import keras

    b, c = float(p.get("brightness", 0.1)) * s, float(p.get("contrast", 0.2)) * s
    sat, hue = min(float(p.get("saturation", 0.2)) * s, 0.5), float(p.get("hue", 0.05)) * s
    if max(b, c, sat, hue) <= 0:
        return None
    return keras.layers.RandomColorJitter(
        value_range=VALUE_RANGE,
        brightness_factor=b if b > 0 else None,
        contrast_factor=c if c > 0 else None,
        saturation_factor=(0.5 - sat, 0.5 + sat) if sat > 0 else None,
        hue_factor=(0.0, hue) if hue > 0 else None,
        seed=seed,
    )


def _gaussian_blur(p: dict, s: float, seed: int):
    import keras

    # Focus variation: sigma up to `sigma` * strength (Keras 3.15 caps sigma at 1 pixel).
    sigma, prob = min(float(p.get("sigma", 1.0)) * s, 1.0), float(p.get("probability", 1.0))
    if sigma <= 0 or prob <= 0:
        return None
    return keras.layers.RandomGaussianBlur(
        factor=(prob, prob),
        kernel_size=int(p.get("kernel_size", 3)),
        sigma=sigma,
        value_range=VALUE_RANGE,
        seed=seed,
    )


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


def _randaugment(p: dict, s: float, seed: int):
    """Keras RandAugment, restricted to `ops` (default: all but OFF_STAIN_OPS); magnitude factor * s."""
    f = min(float(p.get("factor", 0.5)) * s, 1.0)
    if f <= 0:
        return None
    ops_ = list(p.get("ops") or [op for op in RANDAUGMENT_OPS if op not in OFF_STAIN_OPS])
    unknown = sorted(set(ops_) - set(RANDAUGMENT_OPS))
    if unknown:
        raise ValueError(f"unknown RandAugment ops {unknown}; choose from {', '.join(RANDAUGMENT_OPS)}")
    return _classes()["CellRandAugment"](
        value_range=VALUE_RANGE, num_ops=int(p.get("num_ops", 2)), factor=f, ops=ops_, seed=seed
    )


def _augmix(p: dict, s: float, seed: int):
    """Keras AugMix (seeded chains, see SeededAugMix), `variants` traced copies picked per batch."""
    f = min(float(p.get("factor", 0.3)) * s, 1.0)
    if f <= 0:
        return None
    classes = _classes()
    copies = [
        classes["SeededAugMix"](
            value_range=VALUE_RANGE,
            num_chains=int(p.get("num_chains", 3)),
            chain_depth=int(p.get("chain_depth", 3)),
            factor=f,
            alpha=float(p.get("alpha", 1.0)),
            all_ops=bool(p.get("all_ops", True)),
            exclude=tuple(p.get("exclude", OFF_STAIN_OPS)),
            seed=seed + k,
        )
        for k in range(max(1, int(p.get("variants", 4))))
    ]
    return copies[0] if len(copies) == 1 else classes["RandomChoice"](copies, seed=seed)


def _erasing(p: dict, s: float, seed: int):
    """Random erasing: each image is erased with probability `probability` * strength."""
    import keras

    f = float(p.get("probability", 0.5)) * s
    if f <= 0:
        return None
    return keras.layers.RandomErasing(
        factor=(f, f),
        scale=tuple(p.get("scale", (0.02, 0.33))),
        fill_value=p.get("fill_value"),
        value_range=VALUE_RANGE,
        seed=seed,
    )


def _elastic(p: dict, s: float, seed: int):
    """Elastic deformation (membranes and nuclei are soft): distortion up to `scale` * strength."""
    import keras

    scale, prob = float(p.get("scale", 0.5)) * s, float(p.get("probability", 1.0))
    if scale <= 0 or prob <= 0:
        return None
    return keras.layers.RandomElasticTransform(
        factor=(prob, prob),
        scale=(0.0, scale),
        fill_mode=p.get("fill_mode", "reflect"),
        value_range=VALUE_RANGE,
        seed=seed,
    )


def _grid_mask(p: dict, s: float, seed: int):
    """KerasCV GridMask: a rotated grid of square holes; hole/cell ratio up to `ratio` * strength."""
    import keras_cv

    ratio = min(float(p.get("ratio", 0.5)) * s, 1.0)
    if ratio <= 0:
        return None
    return keras_cv.layers.GridMask(
        ratio_factor=(0.0, ratio),
        rotation_factor=float(p.get("rotation", 0.5)),
        fill_mode=p.get("fill_mode", "constant"),
        fill_value=float(p.get("fill_value", 0.0)),
        seed=seed,
    )


def _cutout(p: dict, s: float, seed: int):
    """KerasCV RandomCutout: one rectangle per image, sides up to `size` * strength of the image."""
    import keras_cv

    size = min(float(p.get("size", 0.4)) * s, 1.0)
    if size <= 0:
        return None
    return keras_cv.layers.RandomCutout(
        (0.0, size),
        (0.0, size),
        fill_mode=p.get("fill_mode", "constant"),
        fill_value=float(p.get("fill_value", 0.0)),
        seed=seed,
    )


def _channel_shuffle(p: dict, s: float, seed: int):
    """KerasCV ChannelShuffle: permutes R, G, B. No magnitude (on when strength > 0). Far outside what
    staining varies (purple cells turn green), so no shipped pipeline uses it; opt in with
    `+augmentation.one_of.channel_shuffle={}`."""
    import keras_cv

    return keras_cv.layers.ChannelShuffle(groups=int(p.get("groups", 3)), seed=seed) if s > 0 else None


#: op name -> builder(params at strength 1, strength, seed) -> layer or None (None: a no-op at this
#: strength). The keys each builder reads, and their defaults, are its parameters.
OPS: dict[str, Callable[[dict, float, int], Any]] = {
    # geometry (Keras core)
    "flip": _flip,
    "rotation": _rotation,
    "translation": _translation,
    "zoom": _zoom,
    "elastic": _elastic,
    # colour and focus (Keras core)
    "brightness": _brightness,
    "contrast": _contrast,
    "hue": _hue,
    "saturation": _saturation,
    "color_jitter": _color_jitter,
    "gaussian_blur": _gaussian_blur,
    # policies (Keras core)
    "randaugment": _randaugment,
    "augmix": _augmix,
    # occlusion
    "erasing": _erasing,  # Keras core RandomErasing
    "grid_mask": _grid_mask,  # KerasCV
    "cutout": _cutout,  # KerasCV
    "channel_shuffle": _channel_shuffle,  # KerasCV
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


#: Geometric ops that fuse_geometry folds into one RandomAffine resampling.
AFFINE_OPS = ("flip", "rotation", "translation", "zoom")


def _op_of(key: str, params) -> str:
    return params.get("type", key) if isinstance(params, Mapping) else key


def _fused_geometry(spec: dict, strength: float, seed: int, sampler: str = "xla"):
    """One RandomAffine for the flip/rotation/translation/zoom entries of ``layers`` (None if none).

    It goes first: the other ``layers`` are pixel-wise or content-agnostic, so moving the geometry
    ahead of them keeps the distribution. Turn it off with ``fuse_geometry: false``.
    """
    geo = {_op_of(k, v): dict(v) for k, v in spec.items() if v and _op_of(k, v) in AFFINE_OPS}
    if not geo or strength <= 0:
        return None
    fill_modes = {p.get("fill_mode", "reflect") for op, p in geo.items() if op != "flip"}
    if len(fill_modes) > 1:
        raise UserError(
            f"fused geometry needs one fill_mode, got {sorted(fill_modes)}; "
            "make them equal or set augmentation.fuse_geometry=false"
        )
    try:
        return _classes()["RandomAffine"](
            flip_mode=geo["flip"].get("mode", "horizontal") if "flip" in geo else None,
            rotation=float(geo.get("rotation", {}).get("factor", 0.0)) * strength,
            translation=float(geo.get("translation", {}).get("factor", 0.0)) * strength,
            zoom=float(geo.get("zoom", {}).get("factor", 0.0)) * strength,
            fill_mode=fill_modes.pop() if fill_modes else "reflect",
            sampler=sampler,
            seed=seed + 1,
            name="geometry",
        )
    except (TypeError, ValueError) as err:
        raise UserError(f"bad geometry parameters in augmentation.layers: {err}") from None


_CLASSES: dict[str, type] = {}


def _xla_bilinear(images, transform, fill_mode: str):
    """Bilinear affine resampling, XLA-compiled: the same result as TF's ImageProjectiveTransformV3
    (keras.ops.image.affine_transform) to within 0.01 of a grey level for fill modes reflect and nearest,
    ~3x faster on CPU, where that kernel is the bulk of augmentation time.
    ``transform``: (B, 8) output -> input maps, Keras layout."""
    global _XLA_BILINEAR
    if _XLA_BILINEAR is None:
        import tensorflow as tf

        def coordinate(c, n, mode):
            if mode == "reflect":  # (d c b a | a b c d | d c b a)
                c = tf.math.floormod(c + 0.5, 2.0 * n)
                c = tf.where(c >= n, 2.0 * n - c, c) - 0.5
            return tf.clip_by_value(c, 0.0, n - 1.0)  # "nearest": (a a a a | a b c d | d d d d)

        @tf.function(jit_compile=True)
        def resample(images, transform, mode):  # mode: a Python str, fixed per trace
            shape = tf.shape(images)
            batch, h, w = shape[0], shape[1], shape[2]
            hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
            ys, xs = tf.meshgrid(tf.range(hf), tf.range(wf), indexing="ij")
            m = transform[:, :, None, None]
            x_in = m[:, 0] * xs[None] + m[:, 1] * ys[None] + m[:, 2]
            y_in = m[:, 3] * xs[None] + m[:, 4] * ys[None] + m[:, 5]
            x_in, y_in = coordinate(x_in, wf, mode), coordinate(y_in, hf, mode)
            x0, y0 = tf.floor(x_in), tf.floor(y_in)
            wx, wy = (x_in - x0)[..., None], (y_in - y0)[..., None]
            x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
            x1, y1 = tf.minimum(x0 + 1, w - 1), tf.minimum(y0 + 1, h - 1)
            flat = tf.reshape(images, [batch, h * w, -1])

            def pixels(yy, xx):
                index = tf.reshape(yy * w + xx, [batch, h * w])
                return tf.reshape(tf.gather(flat, index, batch_dims=1), tf.shape(images))

            top = pixels(y0, x0) * (1.0 - wx) + pixels(y0, x1) * wx
            bottom = pixels(y1, x0) * (1.0 - wx) + pixels(y1, x1) * wx
            return top * (1.0 - wy) + bottom * wy

        _XLA_BILINEAR = resample
    return _XLA_BILINEAR(images, transform, fill_mode)


_XLA_BILINEAR = None


def _classes() -> dict[str, type]:
    """The Layer subclasses below, defined on first use so that importing bloodcell.augment (e.g. for
    `--help`) does not import Keras."""
    if _CLASSES:
        return _CLASSES
    import random

    import keras
    from keras.src.layers.preprocessing.data_layer import DataLayer
    from keras.src.layers.preprocessing.image_preprocessing import aug_mix as keras_aug_mix

    class RandomChoice(DataLayer):
        """Apply ONE of ``branches`` per batch (uniformly at random; only that branch runs) to a random
        ``rate`` fraction of the batch's images; the others pass through unchanged."""

        def __init__(self, branches, rate=1.0, seed=0, **kwargs):
            super().__init__(**kwargs)
            self.branches = list(branches)
            self.rate = float(rate)
            self.seed = seed
            self.generator = keras.random.SeedGenerator(seed)

        def build(self, input_shape):
            for layer in self.branches:
                if not layer.built:
                    layer.build(input_shape)
            self.built = True

        def call(self, images, training=True):
            b = self.backend
            x = b.cast(images, "float32")
            if not training or not self.branches:
                return x
            seed = self._get_seed_generator(b._backend)
            fns = [
                (lambda layer: lambda t: b.cast(layer(t, training=True), "float32"))(layer)
                for layer in self.branches
            ]
            if len(fns) == 1:
                out = fns[0](x)
            else:
                out = b.core.switch(b.random.randint((), 0, len(fns), seed=seed), fns, x)
            if self.rate >= 1.0:
                return out
            keep = b.random.uniform((b.shape(x)[0], 1, 1, 1), seed=seed) < self.rate
            return b.numpy.where(keep, out, x)

        def compute_output_shape(self, input_shape):
            return input_shape

        def compute_output_spec(self, inputs, training=True):
            return keras.KerasTensor(inputs.shape, dtype="float32")

    class AugmentationPipeline(DataLayer):
        """Cast to float32, apply ``stages`` in order, clip to [0, 255]. With ``training=False`` it only
        casts. A DataLayer, like Keras' own preprocessing layers, so it runs inside a tf.data map (where
        it switches to the TF backend on the CPU) and inside a model alike."""

        def __init__(self, stages=(), seed=0, **kwargs):
            super().__init__(**kwargs)
            self.stages = list(stages)
            self.seed = seed

        def build(self, input_shape):
            for layer in self.stages:
                if not layer.built:
                    layer.build(input_shape)
            self.built = True

        def call(self, images, training=True):
            x = self.backend.cast(images, "float32")
            if not training:
                return x
            for layer in self.stages:
                x = self.backend.cast(layer(x, training=True), "float32")
            return self.backend.numpy.clip(x, VALUE_RANGE[0], VALUE_RANGE[1])

        def compute_output_shape(self, input_shape):
            return input_shape

        def compute_output_spec(self, inputs, training=True):
            return keras.KerasTensor(inputs.shape, dtype="float32")

    class RandomAffine(DataLayer):
        """Flip, rotation, translation and zoom as ONE resampling per image, with Keras' conventions:
        flip = mirror (each enabled axis with p 0.5), angle ~ U(-rotation, rotation) turns, shift ~
        U(-translation, translation) of the size, scale ~ U(1 - zoom, 1 + zoom) (same on both axes).

        Same distribution as RandomFlip -> RandomRotation -> RandomTranslation -> RandomZoom, but those
        resample the image four times; TF's CPU projective-transform kernel dominates augmentation time,
        so one pass is about 3x faster (and blurs less).
        """

        def __init__(
            self,
            flip_mode=None,
            rotation=0.0,
            translation=0.0,
            zoom=0.0,
            fill_mode="reflect",
            interpolation="bilinear",
            sampler="keras",
            seed=0,
            **kwargs,
        ):
            super().__init__(**kwargs)
            self.sampler = sampler  # "xla": _xla_bilinear (TF only, ~3x faster in a CPU tf.data map)
            self.flip_mode = flip_mode
            self.rotation, self.translation, self.zoom = float(rotation), float(translation), float(zoom)
            self.fill_mode, self.interpolation = fill_mode, interpolation
            self.seed = seed
            self.generator = keras.random.SeedGenerator(seed)

        def call(self, images, training=True):
            b = self.backend
            x = b.cast(images, "float32")
            if not training:
                return x
            seed = self._get_seed_generator(b._backend)
            shape = b.shape(x)
            n = shape[0]
            w, h = b.cast(shape[2], "float32"), b.cast(shape[1], "float32")
            cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
            ones, zeros = b.numpy.ones((n,)), b.numpy.zeros((n,))

            def uniform(bound):
                return b.random.uniform((n,), -bound, bound, seed=seed) if bound > 0 else zeros

            def mirror(enabled):  # -1 mirrors, +1 keeps
                if not enabled:
                    return ones
                return b.numpy.where(b.random.uniform((n,), 0.0, 1.0, seed=seed) < 0.5, -ones, ones)

            sx = mirror(self.flip_mode in ("horizontal", "horizontal_and_vertical"))
            sy = mirror(self.flip_mode in ("vertical", "horizontal_and_vertical"))
            theta = uniform(self.rotation) * 2.0 * np.pi
            dx, dy = uniform(self.translation) * w, uniform(self.translation) * h
            z = 1.0 + uniform(self.zoom)
            cos, sin = b.numpy.cos(theta), b.numpy.sin(theta)
            # output pixel p -> input pixel: flip(rotate(translate(zoom(p)))), every step about the centre:
            # u = z (p - c) - d;  v = R u;  input = S v + c   (S = diag(sx, sy), R = rotation by theta)
            a0, a1 = sx * cos * z, -sx * sin * z
            b0, b1 = sy * sin * z, sy * cos * z
            a2 = cx - sx * (cos * dx - sin * dy) - (a0 * cx + a1 * cy)
            b2 = cy - sy * (sin * dx + cos * dy) - (b0 * cx + b1 * cy)
            transform = b.numpy.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
            if (
                self.sampler == "xla"
                and self.interpolation == "bilinear"
                and b.name == "tensorflow"
                and self.fill_mode in ("reflect", "nearest")
            ):
                return _xla_bilinear(x, transform, self.fill_mode)
            return b.image.affine_transform(
                x,
                transform,
                interpolation=self.interpolation,
                fill_mode=self.fill_mode,
                data_format="channels_last",
            )

        def compute_output_shape(self, input_shape):
            return input_shape

        def compute_output_spec(self, inputs, training=True):
            return keras.KerasTensor(inputs.shape, dtype="float32")

    class CellRandAugment(keras.layers.RandAugment):
        """Keras RandAugment restricted to ``ops``, running only the drawn op of each slot.

        Keras 3.15 computes every op for each of `num_ops` slots and keeps one with `where` (11x the
        work); here each slot is a `switch`, so only the chosen op runs. Same distribution otherwise:
        `num_ops` ops drawn per batch, all at magnitude `factor`."""

        def __init__(self, *args, ops=RANDAUGMENT_OPS, **kwargs):
            super().__init__(*args, **kwargs)
            self._AUGMENT_LAYERS = list(ops)

        def transform_images(self, images, transformation, training=True):
            b = self.backend
            images = b.cast(images, self.compute_dtype)
            if not training or transformation is None:
                return images
            transforms = transformation["transforms"]

            def branch(name):
                layer = getattr(self, name)
                return lambda t: b.cast(layer.transform_images(t, transforms[name]), self.compute_dtype)

            branches = [branch(name) for name in transforms]
            for i in range(self.num_ops):
                images = b.core.switch(transformation["layer_idxes"][i], branches, images)
            return images

    class SeededAugMix(keras.layers.AugMix):
        """Keras 3.15's AugMix draws its op chains with Python's global `random` while *tracing*: inside
        tf.data or a compiled model the chains are frozen at trace time and not tied to `seed`. This
        subclass draws them from its own `random.Random(seed)` (reproducible); build_augmentation puts
        several such copies behind a RandomChoice (`variants`) so that training sees several chain sets."""

        def __init__(self, *args, exclude=(), **kwargs):
            super().__init__(*args, **kwargs)
            self._augment_layers = [name for name in self._augment_layers if name not in set(exclude)]
            self._chain_rng = random.Random(kwargs.get("seed"))

        def get_random_transformation(self, data, training=True, seed=None):
            saved = keras_aug_mix.py_random
            keras_aug_mix.py_random = self._chain_rng
            try:
                return super().get_random_transformation(data, training=training, seed=seed)
            finally:
                keras_aug_mix.py_random = saved

    _CLASSES.update(
        RandomChoice=RandomChoice,
        AugmentationPipeline=AugmentationPipeline,
        RandomAffine=RandomAffine,
        CellRandAugment=CellRandAugment,
        SeededAugMix=SeededAugMix,
    )
    return _CLASSES


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
    layers_spec = dict(aug.get("layers") or {})
    # In the tf.data map the fused geometry uses the XLA sampler; inside a model (where=model, maybe on
    # a GPU) Keras' own affine_transform.
    sampler = "keras" if aug.get("where", "pipeline") == "model" else "xla"
    fused = (
        _fused_geometry(layers_spec, strength, int(seed), sampler) if aug.get("fuse_geometry", True) else None
    )
    if fused is not None:
        layers_spec = {k: v for k, v in layers_spec.items() if _op_of(k, v) not in AFFINE_OPS}
    stages = ([fused] if fused is not None else []) + _build_ops(layers_spec, strength, int(seed), "layers")
    choices = _build_ops(aug.get("one_of") or {}, strength, int(seed) + 7, "one_of")
    rate = float(aug.get("one_of_rate", 1.0))
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"augmentation.one_of_rate={rate} is outside [0, 1]; pick a fraction of images")
    if rate == 0.0:
        choices = []
    if choices:
        stages.append(_classes()["RandomChoice"](choices, rate=rate, seed=int(seed) + 11, name="one_of"))
    if not stages:
        return None
    layer = _classes()["AugmentationPipeline"](
        stages, seed=int(seed), name=f"augment_{aug.get('name', 'custom')}"
    )
    layer.aug_config = aug  # lets preview_grid rebuild an independent copy under another seed
    return layer


def build_mixer(aug_cfg: Any, num_classes: int, seed: int):
    """The batch-level label mixer of ``aug_cfg.mixer`` (MixUp or CutMix, Keras core), or None.

    Returns ``mix(images, onehot) -> (images, soft_labels)`` for batches of float or uint8 pixels in
    [0, 255] and one-hot (B, num_classes) labels: float32 images in [0, 255] and float32 soft labels
    whose rows sum to 1. Apply it after ``build_augmentation``'s layer, on training batches only.

    ``mixer.kind: mixup`` mixes whole images with weights ~ Beta(alpha * strength, alpha * strength):
    small alpha keeps most images close to one source. ``mixer.kind: cutmix`` pastes a box of another
    image, box area ~ Beta(a, a) with a ~ U(0, factor * strength). Labels are mixed by pixel share.
    """
    aug = _cfg_to_dict(aug_cfg)
    spec = aug.get("mixer")
    if not spec:
        return None
    spec = dict(spec)
    strength = _strength(aug)
    kind = spec.get("kind")
    if strength == 0.0:
        return None
    import keras

    if kind == "mixup":
        alpha = float(spec.get("alpha", 0.4)) * strength
        layer = keras.layers.MixUp(alpha=alpha, seed=int(seed) + 99)
    elif kind == "cutmix":
        factor = min(float(spec.get("factor", 1.0)) * strength, 1.0)
        layer = keras.layers.CutMix(factor=factor, seed=int(seed) + 99)
    else:
        raise UserError(f"unknown augmentation.mixer.kind '{kind}'; use mixup or cutmix")
    if num_classes < 2:
        raise UserError(f"a label mixer needs at least 2 classes, got num_classes={num_classes}")

    def mix(images, onehot_labels):
        from keras import ops

        out = layer(
            {"images": ops.cast(images, "float32"), "labels": ops.cast(onehot_labels, "float32")},
            training=True,
        )
        return ops.clip(ops.cast(out["images"], "float32"), *VALUE_RANGE), ops.cast(out["labels"], "float32")

    mix.layer = layer  # for inspection (tests, preview)
    mix.kind = kind
    return mix


def preview_grid(
    images_uint8: np.ndarray,
    aug_layer,
    views: int = 6,
    seed: int | None = None,
    *,
    mixer=None,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Original + ``views`` augmented views of each image, as one uint8 (rows, cols, 3) image.

    Row i is ``images_uint8[i]``; column 0 the original, then the views. Tiles are upscaled to at least
    MIN_TILE px (nearest neighbour), with PAD px of white between them. ``aug_layer`` is a layer from
    ``build_augmentation`` (None: the views equal the original). With ``seed`` set, the views come from
    a fresh copy of that pipeline seeded by ``seed``: reproducible, and the training layer's random
    stream is left untouched. ``mixer`` (from ``build_mixer``) mixes each view's batch within these images;
    ``labels`` (int class ids) only matter for it.
    """
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3 or images_uint8.dtype != np.uint8:
        raise UserError(
            f"preview needs uint8 images (N, H, W, 3), got {images_uint8.dtype} {images_uint8.shape}"
        )
    if views < 1:
        raise UserError(f"views={views} must be at least 1")
    if seed is not None and getattr(aug_layer, "aug_config", None) is not None:
        aug_layer = build_augmentation(aug_layer.aug_config, seed)
    onehot = None
    if mixer is not None:
        lab = np.zeros(len(images_uint8), np.int64) if labels is None else np.asarray(labels)
        onehot = np.eye(max(int(lab.max()) + 1, 2), dtype=np.float32)[lab]
    shown = []
    for _ in range(views):
        batch = images_uint8.astype(np.float32)
        if aug_layer is not None:
            batch = np.asarray(aug_layer(batch, training=True))
        if mixer is not None:
            batch = np.asarray(mixer(batch, onehot)[0])
        shown.append(np.clip(np.rint(batch), 0, 255).astype(np.uint8))

    n, h, w, _ = images_uint8.shape
    scale = max(1, -(-MIN_TILE // max(h, w)))  # ceil
    th, tw = h * scale, w * scale
    cols = 1 + views
    grid = np.full((n * (th + PAD) + PAD, cols * (tw + PAD) + PAD, 3), 255, np.uint8)
    for i in range(n):
        for j in range(cols):
            tile = images_uint8[i] if j == 0 else shown[j - 1][i]
            y, x = PAD + i * (th + PAD), PAD + j * (tw + PAD)
            grid[y : y + th, x : x + tw] = tile.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid
