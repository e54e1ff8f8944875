"""Fused geometry: flip, rotation, translation and zoom as ONE resampling per image (``RandomAffine``),
and the XLA-compiled bilinear sampler it uses in the tf.data map.

TF's CPU projective-transform kernel is most of the cost of geometric augmentation, so resampling once
instead of four times, with a sampler XLA compiles, is about 3x faster (and blurs less). See
benchmarks/augment_throughput.py. Importing this module imports Keras and TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from bloodcell.augment.layers import FloatImageLayer
from bloodcell.augment.ops import OPS, op_of
from bloodcell.core.errors import UserError

#: Geometric ops that fuse_geometry folds into one RandomAffine resampling.
AFFINE_OPS = ("flip", "rotation", "translation", "zoom")


def _coordinate(c: tf.Tensor, n: tf.Tensor, mode: str) -> tf.Tensor:
    if mode == "reflect":  # (d c b a | a b c d | d c b a)
        c = tf.math.floormod(c + 0.5, 2.0 * n)
        c = tf.where(c >= n, 2.0 * n - c, c) - 0.5
    return tf.clip_by_value(c, 0.0, n - 1.0)  # "nearest": (a a a a | a b c d | d d d d)


@tf.function(jit_compile=True)
def xla_bilinear(images: tf.Tensor, transform: tf.Tensor, fill_mode: str) -> tf.Tensor:
    """Bilinear affine resampling, XLA-compiled: the same result as TF's ImageProjectiveTransformV3
    (keras.ops.image.affine_transform) to within 0.01 of a grey level for fill modes reflect and nearest,
    ~3x faster on CPU, where that kernel is the bulk of augmentation time.

    ``transform``: (B, 8) output -> input maps, Keras layout. ``fill_mode`` is a Python str: one trace each.
    """
    shape = tf.shape(images)
    batch, h, w = shape[0], shape[1], shape[2]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    ys, xs = tf.meshgrid(tf.range(hf), tf.range(wf), indexing="ij")
    m = transform[:, :, None, None]
    x_in = m[:, 0] * xs[None] + m[:, 1] * ys[None] + m[:, 2]
    y_in = m[:, 3] * xs[None] + m[:, 4] * ys[None] + m[:, 5]
    x_in, y_in = _coordinate(x_in, wf, fill_mode), _coordinate(y_in, hf, fill_mode)
    x0, y0 = tf.floor(x_in), tf.floor(y_in)
    wx, wy = (x_in - x0)[..., None], (y_in - y0)[..., None]
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    x1, y1 = tf.minimum(x0 + 1, w - 1), tf.minimum(y0 + 1, h - 1)
    flat = tf.reshape(images, [batch, h * w, -1])

    def pixels(yy: tf.Tensor, xx: tf.Tensor) -> tf.Tensor:
        index = tf.reshape(yy * w + xx, [batch, h * w])
        return tf.reshape(tf.gather(flat, index, batch_dims=1), tf.shape(images))

    top = pixels(y0, x0) * (1.0 - wx) + pixels(y0, x1) * wx
    bottom = pixels(y1, x0) * (1.0 - wx) + pixels(y1, x1) * wx
    return top * (1.0 - wy) + bottom * wy


class RandomAffine(FloatImageLayer):
    """Flip, rotation, translation and zoom as ONE resampling per image, with Keras' conventions:
    flip = mirror (each enabled axis with p 0.5), angle ~ U(-rotation, rotation) turns, shift ~
    U(-translation, translation) of the size, scale ~ U(1 - zoom, 1 + zoom) (same on both axes).

    Same distribution as RandomFlip -> RandomRotation -> RandomTranslation -> RandomZoom, but those
    resample the image four times. ``sampler="xla"``: ``xla_bilinear`` where it applies (bilinear,
    fill reflect or nearest, TensorFlow); otherwise Keras' ``affine_transform``.
    """

    def __init__(
        self,
        flip_mode: str | None = None,
        rotation: float = 0.0,
        translation: float = 0.0,
        zoom: float = 0.0,
        fill_mode: str = "reflect",
        interpolation: str = "bilinear",
        sampler: str = "keras",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sampler = sampler
        self.flip_mode = flip_mode
        self.rotation, self.translation, self.zoom = float(rotation), float(translation), float(zoom)
        self.fill_mode, self.interpolation = fill_mode, interpolation
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images: Any, training: bool = True) -> Any:
        x = ops.cast(images, "float32")
        if not training:
            return x
        shape = ops.shape(x)
        n = shape[0]
        w, h = ops.cast(shape[2], "float32"), ops.cast(shape[1], "float32")
        cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
        ones, zeros = ops.ones((n,)), ops.zeros((n,))

        def uniform(bound: float) -> Any:
            return keras.random.uniform((n,), -bound, bound, seed=self.generator) if bound > 0 else zeros

        def mirror(enabled: bool) -> Any:  # -1 mirrors, +1 keeps
            if not enabled:
                return ones
            return ops.where(keras.random.uniform((n,), 0.0, 1.0, seed=self.generator) < 0.5, -ones, ones)

        sx = mirror(self.flip_mode in ("horizontal", "horizontal_and_vertical"))
        sy = mirror(self.flip_mode in ("vertical", "horizontal_and_vertical"))
        theta = uniform(self.rotation) * 2.0 * np.pi
        dx, dy = uniform(self.translation) * w, uniform(self.translation) * h
        z = 1.0 + uniform(self.zoom)
        cos, sin = ops.cos(theta), ops.sin(theta)
        # output pixel p -> input pixel: flip(rotate(translate(zoom(p)))), every step about the centre:
        # u = z (p - c) - d;  v = R u;  input = S v + c   (S = diag(sx, sy), R = rotation by theta)
        a0, a1 = sx * cos * z, -sx * sin * z
        b0, b1 = sy * sin * z, sy * cos * z
        a2 = cx - sx * (cos * dx - sin * dy) - (a0 * cx + a1 * cy)
        b2 = cy - sy * (sin * dx + cos * dy) - (b0 * cx + b1 * cy)
        transform = ops.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        if (
            self.sampler == "xla"
            and self.interpolation == "bilinear"
            and keras.backend.backend() == "tensorflow"
            and self.fill_mode in ("reflect", "nearest")
        ):
            return xla_bilinear(x, transform, self.fill_mode)
        return ops.image.affine_transform(
            x,
            transform,
            interpolation=self.interpolation,
            fill_mode=self.fill_mode,
            data_format="channels_last",
        )


def fused_geometry(
    spec: Mapping[str, Any], strength: float, seed: int, sampler: str = "xla"
) -> RandomAffine | None:
    """One RandomAffine for the flip/rotation/translation/zoom entries of ``layers`` (None if none).

    It goes first: the other ``layers`` are pixel-wise or content-agnostic, so moving the geometry
    ahead of them keeps the distribution. Turn it off with ``fuse_geometry: false``.
    """
    geo = {op_of(k, v): OPS[op_of(k, v)].given(v) for k, v in spec.items() if v and op_of(k, v) in AFFINE_OPS}
    if not geo or strength <= 0:
        return None
    fill_modes = {p["fill_mode"] for op, p in geo.items() if op != "flip"}
    if len(fill_modes) > 1:
        raise UserError(
            f"fused geometry needs one fill_mode, got {sorted(fill_modes)}; "
            "make them equal or set augmentation.fuse_geometry=false"
        )

    def factor(op: str) -> float:
        """The op's magnitude at this strength; 0 for an op the pipeline does not have."""
        return float(geo[op]["factor"]) * strength if op in geo else 0.0

    try:
        return RandomAffine(
            flip_mode=geo["flip"]["mode"] if "flip" in geo else None,
            rotation=factor("rotation"),
            translation=factor("translation"),
            zoom=factor("zoom"),
            fill_mode=fill_modes.pop() if fill_modes else "reflect",
            sampler=sampler,
            seed=seed + 1,
            name="geometry",
        )
    except (TypeError, ValueError) as err:
        raise UserError(f"bad geometry parameters in augmentation.layers: {err}") from None
