"""The ops a config may name under ``layers`` / ``one_of``: one table saying, for each, which parameters
scale with ``strength`` and which layer they build.

Importing this module imports Keras; ``bloodcell.augment`` loads it on first use only.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import keras

from bloodcell.augment.layers import (
    OFF_STAIN_OPS,
    RANDAUGMENT_OPS,
    CellRandAugment,
    RandomChoice,
    SeededAugMix,
)
from bloodcell.augment.pixels import VALUE_RANGE
from bloodcell.core.errors import UserError

#: (magnitudes at this strength, the op's parameters with its defaults, seed) -> layer
Make = Callable[[dict[str, float], Mapping[str, Any], int], keras.layers.Layer]


@dataclass(frozen=True)
class Op:
    """How one op reads its parameters, and their defaults: an op's parameters are the keyword arguments
    of its layer, and a config may name any op with any of them left out (``+augmentation.one_of.erasing=
    {probability: 0.5}``), so each op's entry is where its defaults live (`given`), as a function's do.

    ``scaled``: parameter -> (its value at strength 1 when the config leaves it out, cap); each is
    multiplied by strength, then capped. The op is a no-op (None) when every one of them ends up <= 0, and
    an op without any is on whenever strength > 0. ``probability``: the default of an unscaled
    ``probability`` parameter (the share of images touched), for the ops that take one; 0 turns them off.
    ``defaults``: the other parameters the op reads, with their values when the config leaves them out.
    ``make(magnitudes, params, seed)`` builds the layer from those values and the other parameters.
    """

    make: Make
    scaled: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    probability: float | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def given(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` (as a config writes them) over this op's defaults: every parameter it reads."""
        defaults = {key: default for key, (default, _) in self.scaled.items()} | dict(self.defaults)
        if self.probability is not None:
            defaults["probability"] = self.probability
        return defaults | dict(params)

    def __call__(self, params: Mapping[str, Any], strength: float, seed: int) -> keras.layers.Layer | None:
        """The layer for ``params`` (the magnitudes at strength 1) at ``strength``, or None if a no-op."""
        given = self.given(params)
        magnitudes = {key: min(float(given[key]) * strength, cap) for key, (_, cap) in self.scaled.items()}
        if self.probability is not None:
            magnitudes["probability"] = float(given["probability"])
            if magnitudes["probability"] <= 0:
                return None
        if strength <= 0 or (self.scaled and max(magnitudes[key] for key in self.scaled) <= 0):
            return None
        return self.make(magnitudes, given, seed)


def _keras_cv() -> Any:
    # KerasCV takes about a second to import: only pipelines that use its layers pay for it.
    return importlib.import_module("keras_cv")


#: how the geometric ops fill the pixels they move in from outside the image (conf/augmentation/'s choice)
REFLECT = {"fill_mode": "reflect"}
#: the occlusion ops paint their holes black by default
BLACK = {"fill_mode": "constant", "fill_value": 0.0}


def _randaugment(m: dict[str, float], p: Mapping[str, Any], seed: int) -> CellRandAugment:
    """Keras RandAugment restricted to `ops` (null: all but OFF_STAIN_OPS)."""
    chosen = list(p["ops"] or [op for op in RANDAUGMENT_OPS if op not in OFF_STAIN_OPS])
    unknown = sorted(set(chosen) - set(RANDAUGMENT_OPS))
    if unknown:
        raise ValueError(f"unknown RandAugment ops {unknown}; choose from {', '.join(RANDAUGMENT_OPS)}")
    num_ops = int(p["num_ops"])
    return CellRandAugment(
        value_range=VALUE_RANGE, num_ops=num_ops, factor=m["factor"], ops=chosen, seed=seed
    )


def _augmix(m: dict[str, float], p: Mapping[str, Any], seed: int) -> keras.layers.Layer:
    """Keras AugMix with seeded chains, `variants` traced copies picked per batch."""
    copies = [
        SeededAugMix(
            value_range=VALUE_RANGE,
            num_chains=int(p["num_chains"]),
            chain_depth=int(p["chain_depth"]),
            factor=m["factor"],
            alpha=float(p["alpha"]),
            all_ops=bool(p["all_ops"]),
            exclude=tuple(p["exclude"]),
            seed=seed + k,
        )
        for k in range(max(1, int(p["variants"])))
    ]
    return copies[0] if len(copies) == 1 else RandomChoice(copies, seed=seed)


def _color_jitter(m: dict[str, float], p: Mapping[str, Any], seed: int) -> keras.layers.Layer:
    """Stain-like colour variation: brightness, contrast, saturation (0.5 +- value) and hue."""
    b, c, sat, hue = m["brightness"], m["contrast"], m["saturation"], m["hue"]
    return keras.layers.RandomColorJitter(
        value_range=VALUE_RANGE,
        brightness_factor=b if b > 0 else None,
        contrast_factor=c if c > 0 else None,
        saturation_factor=(0.5 - sat, 0.5 + sat) if sat > 0 else None,
        hue_factor=(0.0, hue) if hue > 0 else None,
        seed=seed,
    )


NO_CAP = math.inf
#: op name -> Op. The parameters each op reads, with their defaults, are in its entry.
OPS: dict[str, Op] = {
    # geometry (Keras core); a flip has no magnitude: cells have no orientation, so it is on with the rest
    "flip": Op(
        lambda m, p, seed: keras.layers.RandomFlip(p["mode"], seed=seed), defaults={"mode": "horizontal"}
    ),
    "rotation": Op(
        lambda m, p, seed: keras.layers.RandomRotation(m["factor"], fill_mode=p["fill_mode"], seed=seed),
        {"factor": (0.7, NO_CAP)},
        defaults=REFLECT,
    ),
    "translation": Op(
        lambda m, p, seed: keras.layers.RandomTranslation(
            m["factor"], m["factor"], fill_mode=p["fill_mode"], seed=seed
        ),
        {"factor": (0.15, NO_CAP)},
        defaults=REFLECT,
    ),
    "zoom": Op(
        lambda m, p, seed: keras.layers.RandomZoom(m["factor"], fill_mode=p["fill_mode"], seed=seed),
        {"factor": (0.3, NO_CAP)},
        defaults=REFLECT,
    ),
    # elastic deformation (membranes and nuclei are soft)
    "elastic": Op(
        lambda m, p, seed: keras.layers.RandomElasticTransform(
            factor=(m["probability"], m["probability"]),
            scale=(0.0, m["scale"]),
            fill_mode=p["fill_mode"],
            value_range=VALUE_RANGE,
            seed=seed,
        ),
        {"scale": (0.5, NO_CAP)},
        probability=1.0,
        defaults=REFLECT,
    ),
    # colour and focus (Keras core)
    "brightness": Op(
        lambda m, p, seed: keras.layers.RandomBrightness(m["factor"], value_range=VALUE_RANGE, seed=seed),
        {"factor": (0.2, NO_CAP)},
    ),
    "contrast": Op(
        lambda m, p, seed: keras.layers.RandomContrast(m["factor"], value_range=VALUE_RANGE, seed=seed),
        {"factor": (0.2, NO_CAP)},
    ),
    # a shift of up to +-factor/2 of the colour circle (Keras' convention)
    "hue": Op(
        lambda m, p, seed: keras.layers.RandomHue((0.0, m["factor"]), value_range=VALUE_RANGE, seed=seed),
        {"factor": (0.1, NO_CAP)},
    ),
    # Keras: 0.5 keeps the image, 0 is grey, 1 fully saturated; sampled within 0.5 +- factor
    "saturation": Op(
        lambda m, p, seed: keras.layers.RandomSaturation(
            (0.5 - m["factor"], 0.5 + m["factor"]), value_range=VALUE_RANGE, seed=seed
        ),
        {"factor": (0.2, 0.5)},
    ),
    "color_jitter": Op(
        _color_jitter,
        {
            "brightness": (0.1, NO_CAP),
            "contrast": (0.2, NO_CAP),
            "saturation": (0.2, 0.5),
            "hue": (0.05, NO_CAP),
        },
    ),
    # focus variation (Keras 3.15 caps sigma at 1 pixel)
    "gaussian_blur": Op(
        lambda m, p, seed: keras.layers.RandomGaussianBlur(
            factor=(m["probability"], m["probability"]),
            kernel_size=int(p["kernel_size"]),
            sigma=m["sigma"],
            value_range=VALUE_RANGE,
            seed=seed,
        ),
        {"sigma": (1.0, 1.0)},
        probability=1.0,
        defaults={"kernel_size": 3},
    ),
    # policies (Keras core)
    "randaugment": Op(_randaugment, {"factor": (0.5, 1.0)}, defaults={"ops": None, "num_ops": 2}),
    "augmix": Op(
        _augmix,
        {"factor": (0.3, 1.0)},
        defaults={
            "num_chains": 3,
            "chain_depth": 3,
            "alpha": 1.0,
            "all_ops": True,
            "exclude": OFF_STAIN_OPS,
            "variants": 4,
        },
    ),
    # occlusion: random erasing (Keras core), each image erased with probability `probability` * strength
    "erasing": Op(
        lambda m, p, seed: keras.layers.RandomErasing(
            factor=(m["probability"], m["probability"]),
            scale=tuple(p["scale"]),
            fill_value=p["fill_value"],
            value_range=VALUE_RANGE,
            seed=seed,
        ),
        {"probability": (0.5, NO_CAP)},
        defaults={"scale": (0.02, 0.33), "fill_value": None},
    ),
    # KerasCV GridMask: a rotated grid of square holes, hole/cell ratio up to `ratio` * strength
    "grid_mask": Op(
        lambda m, p, seed: _keras_cv().layers.GridMask(
            ratio_factor=(0.0, m["ratio"]),
            rotation_factor=float(p["rotation"]),
            fill_mode=p["fill_mode"],
            fill_value=float(p["fill_value"]),
            seed=seed,
        ),
        {"ratio": (0.5, 1.0)},
        defaults={"rotation": 0.5, **BLACK},
    ),
    # KerasCV RandomCutout: one rectangle per image, sides up to `size` * strength of the image
    "cutout": Op(
        lambda m, p, seed: _keras_cv().layers.RandomCutout(
            (0.0, m["size"]),
            (0.0, m["size"]),
            fill_mode=p["fill_mode"],
            fill_value=float(p["fill_value"]),
            seed=seed,
        ),
        {"size": (0.4, 1.0)},
        defaults=BLACK,
    ),
    # KerasCV ChannelShuffle: permutes R, G, B, no magnitude. Far outside what staining varies (purple
    # cells turn green), so no shipped pipeline uses it; opt in with
    # `+augmentation.one_of.channel_shuffle={}`.
    "channel_shuffle": Op(
        lambda m, p, seed: _keras_cv().layers.ChannelShuffle(groups=int(p["groups"]), seed=seed),
        defaults={"groups": 3},
    ),
}


def op_of(key: str, params: Any) -> str:
    """The op a config entry names: its ``type``, else its key."""
    return str(params["type"]) if isinstance(params, Mapping) and "type" in params else key


def build_ops(spec: Mapping[str, Any], strength: float, seed: int, where: str) -> list[keras.layers.Layer]:
    """Build the layers of one section (``layers`` or ``one_of``, named by ``where``), in file order."""
    built = []
    for i, (key, params) in enumerate(spec.items()):
        if params is None or params is False:
            continue  # dropped from the command line: augmentation.layers.<key>=null
        op = op_of(key, params)
        params = {k: v for k, v in params.items() if k != "type"} if isinstance(params, Mapping) else {}
        if op not in OPS:
            raise UserError(
                f"unknown augmentation op '{op}' in augmentation.{where}.{key}; "
                f"known ops: {', '.join(sorted(OPS))}"
            )
        try:
            layer = OPS[op](params, strength, seed + 1000 * (i + 1))
        except (TypeError, ValueError) as err:
            raise UserError(f"bad parameters for augmentation.{where}.{key}: {err}") from None
        if layer is not None:
            built.append(layer)
    return built
