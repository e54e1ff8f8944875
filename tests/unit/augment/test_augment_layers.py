"""Fast unit tests of bloodcell.augment's pieces, in process: every op of the table builds and runs, every
layer is importable and runs on a small batch, seeded layers repeat themselves, the package stays light."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import numpy as np
import pytest

import bloodcell.augment as augment

PACKAGE = Path(augment.__file__).parent
#: what importing them costs seconds: Keras (and with it TensorFlow), and the submodules that import it
HEAVY_MODULES = {"keras", "keras_cv", "tensorflow"} | {
    f"bloodcell.augment.{name}" for name in ("ops", "layers", "geometry")
}


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype(np.float32)


def module_level_imports(path: Path) -> set[str]:
    """The modules (and their parent packages) a module imports when it is imported, TYPE_CHECKING
    blocks left out."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                break
            if isinstance(sub, ast.Import):
                modules = [alias.name for alias in sub.names]
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                modules = [sub.module]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                names |= {".".join(parts[: k + 1]) for k in range(len(parts))}
    return names


@pytest.mark.parametrize("module", ["__init__", "pipeline", "mix", "preview"])
def test_the_package_and_its_light_modules_do_not_import_keras_when_imported(module):
    assert not module_level_imports(PACKAGE / f"{module}.py") & HEAVY_MODULES


def test_no_private_keras_imports():
    for path in PACKAGE.glob("*.py"):
        assert "keras.src" not in path.read_text(), path


@pytest.mark.parametrize("name", sorted(augment.OPS))
def test_every_op_builds_a_layer_that_keeps_the_shape(name, batch):
    import keras

    layer = augment.OPS[name]({}, 1.0, seed=3)
    assert isinstance(layer, keras.layers.Layer)
    out = np.asarray(layer(batch, training=True)).astype(np.float32)
    assert out.shape == batch.shape and np.isfinite(out).all()  # the range is the pipeline's to clip
    assert augment.OPS[name]({}, 0.0, seed=3) is None


@pytest.mark.parametrize(
    "name,params",
    [
        ("rotation", {"factor": 0.0}),
        ("color_jitter", {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}),
        ("gaussian_blur", {"probability": 0.0}),
        ("elastic", {"scale": 0.0}),
    ],
)
def test_an_op_whose_magnitudes_are_zero_is_dropped(name, params):
    assert augment.OPS[name](params, 1.0, seed=0) is None


def test_magnitudes_scale_with_strength_and_stop_at_their_cap():
    assert augment.OPS["rotation"]({"factor": 0.6}, 0.5, 0).factor == pytest.approx((-0.3, 0.3))
    saturation = augment.OPS["saturation"]({"factor": 2.0}, 1.0, 0)  # capped at 0.5: grey to full
    assert saturation.factor == pytest.approx((0.0, 1.0))
    jitter = augment.OPS["color_jitter"]({"brightness": 0, "hue": 0.1}, 0.5, 0)
    assert jitter.brightness_factor is None and jitter.hue_factor == pytest.approx((0.0, 0.05))


@pytest.mark.parametrize(
    "name", ["AugmentationPipeline", "RandomChoice", "RandomAffine", "CellRandAugment", "SeededAugMix"]
)
def test_every_layer_is_a_top_level_keras_class(name):
    import keras

    from bloodcell.augment import geometry, layers

    cls = getattr(augment, name)
    assert issubclass(cls, keras.layers.Layer)
    assert cls is getattr(layers, name, None) or cls is getattr(geometry, name, None)


SEEDED = ["affine_xla", "affine_keras", "choice", "pipeline", "randaugment", "augmix"]


def make_layer(name: str, seed: int):
    """A small instance of each of bloodcell's layers, every random part seeded by ``seed``."""
    import keras

    from bloodcell.augment import (
        AugmentationPipeline,
        CellRandAugment,
        RandomAffine,
        RandomChoice,
        SeededAugMix,
    )

    if name.startswith("affine"):
        return RandomAffine("horizontal_and_vertical", 0.3, 0.1, 0.2, sampler=name[7:], seed=seed)
    if name == "choice":
        brightness = keras.layers.RandomBrightness(0.3, value_range=(0, 255), seed=seed)
        return RandomChoice([brightness, RandomAffine(rotation=0.4, seed=seed)], rate=0.5, seed=seed)
    if name == "pipeline":
        contrast = keras.layers.RandomContrast(0.3, value_range=(0, 255), seed=seed)
        return AugmentationPipeline([RandomAffine(rotation=0.4, seed=seed), contrast], seed=seed)
    if name == "randaugment":
        return CellRandAugment(value_range=(0, 255), factor=0.5, num_ops=2, seed=seed)
    return SeededAugMix(value_range=(0, 255), factor=0.5, chain_depth=2, seed=seed)


def run_in_tf_data(layer, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(images).batch(2).map(lambda x: layer(x, training=True))
    return np.concatenate([b.numpy() for b in ds])


@pytest.mark.parametrize("name", SEEDED)
def test_each_layer_runs_on_a_batch_and_repeats_itself_under_a_seed(name, batch):
    first = run_in_tf_data(make_layer(name, 7), batch)
    assert first.shape == batch.shape and first.dtype == np.float32
    assert first.min() >= -1e-3 and first.max() <= 255.0 + 1e-3
    np.testing.assert_array_equal(first, run_in_tf_data(make_layer(name, 7), batch))
    assert np.abs(first - batch).mean() > 0.5  # it did something
    eager = np.asarray(make_layer(name, 7)(batch.astype(np.uint8), training=False)).astype(np.float32)
    if name in ("choice", "pipeline") or name.startswith("affine"):
        np.testing.assert_array_equal(eager, batch)  # outside training bloodcell's layers only cast


def test_seeded_augmix_leaves_the_global_random_stream_as_it_was(batch):
    random.seed(11)
    expected = random.random()
    random.seed(11)
    run_in_tf_data(make_layer("augmix", 3), batch)
    assert random.random() == expected


def test_xla_sampler_leaves_the_image_alone_under_the_identity_map(batch):
    from bloodcell.augment.geometry import xla_bilinear

    identity = np.tile(np.array([[1, 0, 0, 0, 1, 0, 0, 0]], np.float32), (len(batch), 1))
    for mode in ("reflect", "nearest"):
        np.testing.assert_allclose(np.asarray(xla_bilinear(batch, identity, mode)), batch, atol=1e-3)


def test_label_mixer_gives_soft_labels_that_sum_to_one(batch):
    mixer = augment.build_mixer({"strength": 1.0, "mixer": {"kind": "mixup", "alpha": 1.0}}, 4, seed=0)
    assert isinstance(mixer, augment.LabelMixer) and mixer.kind == "mixup"
    images, soft = mixer(batch, np.eye(4, dtype=np.float32))
    assert tuple(images.shape) == batch.shape
    np.testing.assert_allclose(np.asarray(soft).sum(axis=1), 1.0, atol=1e-5)
