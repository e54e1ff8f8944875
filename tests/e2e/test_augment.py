"""Augmentation library (issue 3): every shipped pipeline, the strength knob, mixers, sizes, dtypes, the
preview CLI and training runs with augmentation=heavy / mixup. Tiny batches: 32x32 (one 260x260 case)."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.helpers import REPO, TINY, assert_ok, assert_user_error, mlflow_runs, run_module

PIPELINES = ["none", "base", "heavy", "randaugment", "augmix", "mixup", "cutmix"]


def load(name: str, **overrides):
    cfg = OmegaConf.load(REPO / "conf" / "augmentation" / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def cells():
    """16 synthetic cells (two per class) at 32x32, uint8, and their labels."""
    from bloodcell.data import make_demo_set

    images, labels = make_demo_set(per_class=2, image_size=32, seed=3)
    return images, labels


def run_in_tf_data(layer, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """The way training uses the layer: inside a tf.data map over batches (sequential, so reproducible)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size).map(lambda x: layer(x, training=True))
    return np.concatenate([batch.numpy() for batch in ds])


def mean_change(name: str, strength: float, images: np.ndarray, seeds=(0, 1, 2)) -> float:
    from bloodcell.augment import build_augmentation

    changes = []
    for seed in seeds:
        layer = build_augmentation(load(name, strength=strength), seed)
        out = np.asarray(layer(images, training=True))
        changes.append(np.abs(out - images.astype(np.float32)).mean())
    return float(np.mean(changes))


@pytest.mark.parametrize("name", PIPELINES)
def test_shipped_config_has_the_keys_train_reads(name):
    cfg = load(name)
    assert cfg.name == name
    assert 0.0 <= cfg.strength <= 1.0
    assert cfg.where in ("pipeline", "model")


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_keeps_shape_dtype_and_range_in_tf_data(name, cells):
    from bloodcell import NUM_CLASSES
    from bloodcell.augment import build_augmentation, build_mixer

    images, labels = cells
    layer = build_augmentation(load(name), seed=0)
    if name == "none":
        assert layer is None and build_mixer(load(name), NUM_CLASSES, 0) is None
        return
    out = run_in_tf_data(layer, images)
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert np.abs(out - images).mean() > 1.0  # it did something

    mixer = build_mixer(load(name), NUM_CLASSES, 0)
    assert (mixer is not None) == (name in ("mixup", "cutmix"))


@pytest.mark.parametrize("name", PIPELINES)
def test_strength_zero_is_the_identity(name, cells):
    from bloodcell import NUM_CLASSES
    from bloodcell.augment import build_augmentation, build_mixer

    assert build_augmentation(load(name, strength=0.0), seed=0) is None
    assert build_mixer(load(name, strength=0.0), NUM_CLASSES, 0) is None


def test_layer_outside_training_only_casts(cells):
    from bloodcell.augment import build_augmentation

    images, _ = cells
    out = np.asarray(build_augmentation(load("heavy"), seed=0)(images, training=False))
    assert out.dtype == np.float32 and np.array_equal(out, images.astype(np.float32))


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_mixers_give_soft_labels_that_sum_to_one(name, cells):
    import tensorflow as tf

    from bloodcell import NUM_CLASSES
    from bloodcell.augment import build_mixer

    images, labels = cells
    onehot = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    mixer = build_mixer(load(name), NUM_CLASSES, seed=0)
    ds = tf.data.Dataset.from_tensor_slices((images, onehot)).batch(8).map(mixer)
    mixed_images, soft = (np.concatenate(parts) for parts in zip(*[(x.numpy(), y.numpy()) for x, y in ds]))
    assert mixed_images.shape == images.shape and mixed_images.dtype == np.float32
    assert mixed_images.min() >= 0.0 and mixed_images.max() <= 255.0
    assert soft.shape == onehot.shape and soft.dtype == np.float32
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-5)
    assert (soft >= 0).all()
    assert ((soft > 1e-3) & (soft < 1 - 1e-3)).any(), "no label was actually mixed"


def test_heavy_changes_images_more_at_strength_1_than_at_0_3(cells):
    images, _ = cells
    weak, strong = mean_change("heavy", 0.3, images), mean_change("heavy", 1.0, images)
    assert strong > 1.2 * weak, (weak, strong)


def test_base_at_default_strength_is_the_seed_recipe():
    """Keras core layers one by one (fuse_geometry=false) or fused into one resampling: same parameters."""
    from bloodcell.augment import build_augmentation

    layer = build_augmentation(load("base", fuse_geometry=False), seed=0)
    kinds = {type(stage).__name__: stage for stage in layer.stages}
    assert list(kinds) == [
        "RandomFlip",
        "RandomRotation",
        "RandomBrightness",
        "RandomTranslation",
        "RandomZoom",
    ]
    assert kinds["RandomFlip"].mode == "horizontal"
    assert kinds["RandomRotation"].factor == pytest.approx((-0.7, 0.7))
    assert kinds["RandomBrightness"].factor == pytest.approx((-0.2, 0.2))
    assert kinds["RandomTranslation"].height_factor == pytest.approx(0.15)
    assert kinds["RandomZoom"].height_factor == pytest.approx(0.3)

    geometry, brightness = build_augmentation(load("base"), seed=0).stages
    assert type(geometry).__name__ == "RandomAffine" and geometry.flip_mode == "horizontal"
    assert (geometry.rotation, geometry.translation, geometry.zoom) == pytest.approx((0.7, 0.15, 0.3))
    assert brightness.factor == pytest.approx((-0.2, 0.2))


@pytest.mark.parametrize(
    "op,params", [("rotation", {"factor": 0.7}), ("translation", {"factor": 0.15}), ("zoom", {"factor": 0.3})]
)
def test_fused_geometry_changes_images_as_much_as_the_keras_layers(op, params, cells):
    from bloodcell.augment import build_augmentation

    images, _ = cells
    change = {}
    for fuse in (True, False):
        cfg = {"strength": 1.0, "fuse_geometry": fuse, "layers": {op: params}}
        change[fuse] = np.mean(
            [
                np.abs(run_in_tf_data(build_augmentation(cfg, seed), images) - images).mean()
                for seed in range(3)
            ]
        )
    assert change[True] == pytest.approx(change[False], rel=0.3), change


def test_fused_flips_are_exact_mirrors():
    from bloodcell.augment import build_augmentation

    images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3)).astype(np.uint8)
    out = run_in_tf_data(
        build_augmentation({"strength": 1.0, "layers": {"flip": {"mode": "horizontal_and_vertical"}}}, 0),
        images,
    )
    kinds = [
        next(
            k
            for k, candidate in enumerate([im, im[:, ::-1], im[::-1], im[::-1, ::-1]])
            if np.array_equal(o, candidate)
        )
        for o, im in zip(out, images.astype(np.float32))
    ]
    assert set(kinds) == {0, 1, 2, 3}


@pytest.mark.parametrize("fill_mode", ["reflect", "nearest", "constant"])
def test_xla_sampler_matches_keras_affine_transform(fill_mode, cells):
    """The tf.data path (XLA bilinear sampler) and the model path (keras.ops.image.affine_transform)."""
    from bloodcell.augment import build_augmentation

    images, _ = cells
    cfg = {
        "strength": 1.0,
        "layers": {
            "rotation": {"factor": 0.7, "fill_mode": fill_mode},
            "zoom": {"factor": 0.3, "fill_mode": fill_mode},
        },
    }
    fast = run_in_tf_data(build_augmentation(cfg, 3), images)
    keras_path = run_in_tf_data(build_augmentation({**cfg, "where": "model"}, 3), images)
    np.testing.assert_allclose(fast, keras_path, atol=0.02)


def test_cell_randaugment_applies_what_keras_randaugment_would(cells):
    """Only the drawn op runs (switch instead of computing all of them), with the same result."""
    import keras

    from bloodcell.augment import RANDAUGMENT_OPS, CellRandAugment

    images = cells[0].astype(np.float32)
    ops = [op for op in RANDAUGMENT_OPS if op != "solarization"]
    ours = CellRandAugment(factor=0.5, num_ops=2, ops=ops, seed=4)
    theirs = type("KerasRandAugment", (keras.layers.RandAugment,), {"_AUGMENT_LAYERS": ops})(
        factor=0.5, num_ops=2, seed=4
    )
    transformation = ours.get_random_transformation(images, training=True)
    np.testing.assert_allclose(
        np.asarray(ours.transform_images(images, transformation)),
        np.asarray(theirs.transform_images(images, transformation)),
        atol=1e-3,
    )


@pytest.mark.parametrize("name", ["base", "randaugment"])  # every other test feeds uint8 already
def test_uint8_and_float_inputs_give_the_same_result(name, cells):
    from bloodcell.augment import build_augmentation

    images, _ = cells
    from_uint8 = run_in_tf_data(build_augmentation(load(name), seed=5), images)
    from_float = run_in_tf_data(build_augmentation(load(name), seed=5), images.astype(np.float32))
    np.testing.assert_allclose(from_uint8, from_float, atol=1e-3)


@pytest.mark.parametrize("name", ["heavy", "augmix"])
def test_reproducible_under_seed(name, cells):
    """Same seed, same views. KerasCV's layers also draw from TF's global seed, which train sets with
    keras.utils.set_random_seed(cfg.seed) before building the pipeline; so does this test."""
    import keras

    from bloodcell.augment import build_augmentation

    images, _ = cells

    def views(seed):
        keras.utils.set_random_seed(seed)
        return run_in_tf_data(build_augmentation(load(name, strength=1.0), seed=seed), images)

    first, again, other = views(7), views(7), views(8)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("name", ["base", "heavy", "randaugment", "augmix", "cutmix"])
def test_works_at_260_pixels(name, cells):
    import tensorflow as tf

    from bloodcell import NUM_CLASSES
    from bloodcell.augment import build_augmentation, build_mixer

    images, labels = cells
    big = tf.image.resize(images[:4], (260, 260)).numpy().round().astype(np.uint8)
    out = run_in_tf_data(build_augmentation(load(name, strength=1.0), seed=0), big, batch_size=4)
    assert out.shape == big.shape and out.dtype == np.float32 and out.min() >= 0 and out.max() <= 255
    mixer = build_mixer(load(name), NUM_CLASSES, 0)
    if mixer is not None:
        mixed, soft = mixer(out, np.eye(NUM_CLASSES, dtype=np.float32)[labels[:4]])
        assert tuple(mixed.shape) == big.shape
        np.testing.assert_allclose(np.asarray(soft).sum(axis=1), 1.0, atol=1e-5)


def test_layers_can_be_overridden_dropped_and_unknown_ops_are_user_errors(cells):
    from bloodcell.augment import build_augmentation
    from bloodcell.core.errors import UserError

    cfg = load("base")
    cfg.layers.zoom = None
    cfg.layers.rotation.factor = 0.25
    geometry, _ = build_augmentation(cfg, 0).stages
    assert (geometry.rotation, geometry.translation, geometry.zoom) == pytest.approx((0.25, 0.15, 0.0))
    cfg.fuse_geometry = False
    layer = build_augmentation(cfg, 0)
    assert [type(s).__name__ for s in layer.stages] == [
        "RandomFlip",
        "RandomRotation",
        "RandomBrightness",
        "RandomTranslation",
    ]
    assert layer.stages[1].factor == pytest.approx((-0.25, 0.25))
    with pytest.raises(UserError, match="unknown augmentation op 'warp'"):
        build_augmentation({"strength": 1.0, "layers": {"warp": {}}}, 0)
    with pytest.raises(UserError, match="strength"):
        build_augmentation(load("base", strength=1.5), 0)
    with pytest.raises(UserError, match="mixer.kind"):
        from bloodcell.augment import build_mixer

        build_mixer({"strength": 1.0, "mixer": {"kind": "blend"}}, 8, 0)


def test_heavy_inside_a_model_trains(cells):
    """augmentation.where=model: the layer is prepended to the training model (keras KerasCV layers too)."""
    import keras

    from bloodcell import NUM_CLASSES
    from bloodcell.augment import build_augmentation

    images, labels = cells
    inner = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Rescaling(1 / 255.0),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(NUM_CLASSES, "softmax"),
        ]
    )
    model = keras.Sequential([build_augmentation(load("heavy", strength=1.0), 0), inner])
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(
        images.astype(np.float32), np.eye(NUM_CLASSES)[labels], batch_size=8, epochs=1, verbose=0
    )
    assert np.isfinite(history.history["loss"][0])
    np.testing.assert_allclose(
        model.predict(images[:2].astype(np.float32), verbose=0),
        inner.predict(images[:2].astype(np.float32), verbose=0),
        atol=1e-6,
    )


def test_preview_grid_is_an_image_of_originals_and_views(cells):
    import keras

    from bloodcell.augment import MIN_TILE, PAD, build_augmentation, preview_grid

    images, _ = cells
    layer = build_augmentation(load("heavy"), 0)
    keras.utils.set_random_seed(1)
    grid = preview_grid(images[:3], layer, views=4, seed=1)
    tile = MIN_TILE  # 32 px tiles are upscaled 3x to 96
    assert grid.dtype == np.uint8 and grid.shape == (3 * (tile + PAD) + PAD, 5 * (tile + PAD) + PAD, 3)
    np.testing.assert_array_equal(
        grid[PAD : PAD + tile : 3, PAD : PAD + tile : 3], images[0]
    )  # column 0: original
    keras.utils.set_random_seed(1)
    np.testing.assert_array_equal(grid, preview_grid(images[:3], layer, views=4, seed=1))  # seeded copy


def test_preview_cli_writes_a_png_of_the_expected_size_and_keeps_existing_files(tmp_path):
    from PIL import Image

    from bloodcell.augment.preview import preview_size

    out = tmp_path / "grid.png"
    args = [
        "+experiment=quickstart",
        "data.image_size=32",
        "data.per_class=4",
        "augmentation=heavy",
        "augmentation.strength=0.6",
        f"output={out}",
        "samples=3",
        "views=4",
    ]
    proc = run_module("bloodcell.augment_preview", *args, cwd=tmp_path)
    assert_ok(proc)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.size == preview_size((32, 32), samples=3, views=4)
        assert np.asarray(png).std() > 10  # real content, not a blank canvas
    assert not (tmp_path / "outputs").exists()

    before = out.stat().st_mtime_ns
    assert_user_error(
        run_module("bloodcell.augment_preview", *args, cwd=tmp_path), "already exists", "overwrite=true"
    )
    assert out.stat().st_mtime_ns == before
    assert_ok(run_module("bloodcell.augment_preview", *args, "overwrite=true", cwd=tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["heavy", "mixup"])
def test_training_run_with_augmentation(name, tracking):
    proc = run_module(
        "bloodcell.train",
        *TINY,
        f"augmentation={name}",
        f"tracking.uri={tracking}",
        "tracking.experiment=augment",
    )
    assert_ok(proc)
    (run,) = mlflow_runs(tracking, "augment")
    assert run.info.status == "FINISHED"
    assert run.data.params["augmentation.name"] == name
    assert np.isfinite(run.data.metrics["train_loss"])
    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient(tracking).list_artifacts(run.info.run_id, "plots")}
    assert "plots/augmentation_preview.png" in artifacts
