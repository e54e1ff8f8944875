"""Loaders for each data format, the split, class weights and the tf.data pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from bloodcell import CLASS_NAMES
from bloodcell.core.errors import UserError
from bloodcell.data import (
    class_weights,
    fingerprint,
    load_arrays,
    make_demo_set,
    make_tf_dataset,
    read_folder,
    read_medmnist,
    read_npz,
    split_arrays,
)
from tests.helpers import write_npz


def cfg(**kw):
    base = {"val_fraction": 0.15, "test_fraction": 0.15, "limit": None, "clean": False}
    return OmegaConf.create({**base, **kw})


def test_npz_accepts_labels_n_by_1_and_n(tmp_path):
    images, labels = make_demo_set(4, 32, seed=3)
    for shape in [(-1, 1), (-1,)]:
        path = write_npz(tmp_path / "a.npz", images, labels.astype(np.uint8).reshape(shape))
        x, y = read_npz(path)
        assert x.dtype == np.uint8 and x.shape == (32, 32, 32, 3)
        assert y.dtype == np.int64 and y.shape == (32,)
        np.testing.assert_array_equal(y, labels)


def test_npz_refuses_pickled_objects(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, images=np.array([object()], dtype=object), labels=np.zeros(1))
    with pytest.raises(UserError, match="cannot be read"):
        read_npz(path)


def test_folder_of_class_subfolders(tmp_path):
    from PIL import Image

    images, labels = make_demo_set(2, 24, seed=4)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = tmp_path / CLASS_NAMES[label]
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    arrays = load_arrays(cfg(format="folder", path=str(tmp_path)))
    assert arrays.images.shape == (16, 24, 24, 3)
    assert sorted(np.bincount(arrays.labels).tolist()) == [2] * 8
    (tmp_path / "unknown_cell").mkdir()
    with pytest.raises(UserError, match="unknown_cell"):
        read_folder(tmp_path)


def test_medmnist_layout_from_a_local_file(tmp_path):
    """The official layout ({train,val,test}_{images,labels}), written here: no download in tests."""
    images, labels = make_demo_set(6, 28, seed=5)
    parts = np.array_split(np.arange(len(labels)), 3)
    np.savez(
        tmp_path / "bloodmnist.npz",
        **{f"{s}_images": images[p] for s, p in zip(("train", "val", "test"), parts)},
        **{
            f"{s}_labels": labels[p].reshape(-1, 1).astype(np.uint8)
            for s, p in zip(("train", "val", "test"), parts)
        },
    )
    arrays = load_arrays(
        cfg(format="medmnist", size=28, path=str(tmp_path / "bloodmnist.npz"), cache_dir=str(tmp_path))
    )
    assert arrays.images.shape == (48, 28, 28, 3) and len(arrays) == 48
    with pytest.raises(UserError, match="not a BloodMNIST size"):
        read_medmnist(32, None, tmp_path)


def test_demo_is_deterministic_and_balanced():
    a = load_arrays(cfg(format="demo", per_class=5, image_size=32, demo_seed=0))
    b = load_arrays(cfg(format="demo", per_class=5, image_size=32, demo_seed=0))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert np.bincount(a.labels).tolist() == [5] * 8
    assert "synthetic" in a.source


def test_fingerprint_changes_with_one_label():
    images, labels = make_demo_set(2, 16)
    changed = labels.copy()
    changed[0] = (changed[0] + 1) % 8
    assert fingerprint(images, labels) != fingerprint(images, changed)


def test_split_is_stratified_disjoint_and_seeded():
    arrays = load_arrays(cfg(format="demo", per_class=20, image_size=16))
    one, two = split_arrays(arrays, 0.15, 0.15, seed=1), split_arrays(arrays, 0.15, 0.15, seed=1)
    np.testing.assert_array_equal(one.test.labels, two.test.labels)
    assert len(one.train) + len(one.val) + len(one.test) == 160
    for part in (one.train, one.val, one.test):
        assert set(part.labels.tolist()) == set(range(8))  # every class in every split
    train_keys = {im.tobytes() for im in one.train.images}
    assert not any(im.tobytes() in train_keys for im in one.test.images)


def test_balanced_class_weights_favour_rare_classes():
    weights = class_weights(np.array([0] * 10 + [1] * 30))
    assert weights[0] == pytest.approx(2.0) and weights[1] == pytest.approx(2 / 3)


def test_limit_takes_a_stratified_subset():
    arrays = load_arrays(cfg(format="demo", per_class=10, image_size=16, limit=40))
    assert len(arrays) == 40 and np.bincount(arrays.labels).tolist() == [5] * 8


def test_tf_dataset_gives_float_pixels_and_one_hot_labels():
    arrays = load_arrays(cfg(format="demo", per_class=3, image_size=16))
    x, y = next(iter(make_tf_dataset(arrays, 8, training=True, seed=0)))
    assert x.dtype.name == "float32" and tuple(x.shape) == (8, 16, 16, 3)
    assert float(x.numpy().max()) <= 255.0 and tuple(y.shape) == (8, 8)
    np.testing.assert_allclose(y.numpy().sum(axis=1), 1.0)
