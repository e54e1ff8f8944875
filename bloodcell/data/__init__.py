"""Data: arrays from a file or the demo generator, a stratified split, class weights, a tf.data pipeline.

Config group ``data`` (conf/data/*.yaml) maps to this package. Loading and validation use numpy only,
so bad input is reported before TensorFlow is even imported.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bloodcell import NUM_CLASSES, PROJECT_ROOT
from bloodcell.data.demo import make_demo_set
from bloodcell.data.formats import read_folder, read_image, read_medmnist, read_npz, validate
from bloodcell.errors import UserError

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "Arrays",
    "Splits",
    "load_arrays",
    "split_arrays",
    "class_weights",
    "make_tf_dataset",
    "fingerprint",
    "resolve_path",
    "read_npz",
    "read_folder",
    "read_image",
    "read_medmnist",
    "make_demo_set",
    "validate",
]

FORMATS = ("npz", "folder", "medmnist", "demo")


@dataclass
class Arrays:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,)
    fingerprint: str = ""
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Arrays:
        """Part of this set; keeps the fingerprint of the whole set it came from (a split is named by
        its source data, the seed and the fractions)."""
        return Arrays(self.images[index], self.labels[index], self.fingerprint, self.source)


@dataclass
class Splits:
    train: Arrays
    val: Arrays
    test: Arrays


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the pixels, their shape and the labels: names a data set exactly, whatever file it came from."""
    digest = hashlib.sha256()
    digest.update(repr(images.shape).encode())
    digest.update(np.ascontiguousarray(images).data)
    digest.update(np.ascontiguousarray(labels.astype(np.int64)).data)
    return digest.hexdigest()


def resolve_path(path: str | Path) -> Path:
    """A relative input path means the current directory if it exists there, else the project root
    (so `data.path=data/training_set.npz` works from anywhere, also inside a sweep)."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return PROJECT_ROOT / path


def load_arrays(data_cfg) -> Arrays:
    """Load and validate the data set the ``data`` config names; optionally subsample it (``limit``)."""
    fmt = data_cfg.format
    if fmt == "npz":
        path = resolve_path(data_cfg.path)
        images, labels = read_npz(path)
        source = str(path)
    elif fmt == "folder":
        path = resolve_path(data_cfg.path)
        images, labels = read_folder(path)
        source = str(path)
    elif fmt == "medmnist":
        path = resolve_path(data_cfg.path) if data_cfg.get("path") else None
        images, labels = read_medmnist(int(data_cfg.size), path, resolve_path(data_cfg.cache_dir))
        source = str(path or f"bloodmnist_{data_cfg.size}")
    elif fmt == "demo":
        images, labels = make_demo_set(
            int(data_cfg.per_class), int(data_cfg.image_size), int(data_cfg.get("demo_seed", 0))
        )
        source = f"demo (synthetic, {data_cfg.per_class} per class, {data_cfg.image_size}px)"
    else:
        raise UserError(f"data.format={fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    limit = data_cfg.get("limit")
    if limit and limit < len(labels):
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(
            np.arange(len(labels)),
            train_size=int(limit),
            random_state=0,
            stratify=labels if np.bincount(labels).min() >= 2 else None,
        )
        images, labels = images[np.sort(keep)], labels[np.sort(keep)]
    return Arrays(images, labels, fingerprint(images, labels), source)


def split_arrays(arrays: Arrays, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Stratified train / validation / test split, reproducible by ``seed``."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(arrays))
    counts = np.bincount(arrays.labels, minlength=NUM_CLASSES)
    stratify = arrays.labels if counts[counts > 0].min() >= 3 else None
    try:
        rest, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=stratify)
        val_share = val_fraction / (1 - test_fraction)
        train, val = train_test_split(
            rest,
            test_size=val_share,
            random_state=seed,
            stratify=None if stratify is None else arrays.labels[rest],
        )
    except ValueError as err:
        raise UserError(
            f"cannot split {len(arrays)} samples into train/val/test ({err}); "
            "use more data or smaller data.val_fraction / data.test_fraction"
        ) from None
    return Splits(arrays.subset(train), arrays.subset(val), arrays.subset(test))


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """'balanced' weights (n_samples / (n_classes * count)) for the classes present."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    return {int(c): float(w) for c, w in zip(present, weights)}


def make_tf_dataset(
    arrays: Arrays,
    batch_size: int,
    *,
    training: bool,
    seed: int,
    augment: Any = None,
    mixer: Any = None,
    epochs_done: int = 0,
) -> tf.data.Dataset:
    """(float32 pixels 0-255, one-hot float32 labels) batches. Shuffling, ``augment`` (a Keras layer
    called with training=True) and ``mixer`` (batch-level MixUp/CutMix) apply to training batches only.
    Pixels stay uint8 until batched: a quarter of the memory traffic of float32 slices.

    ``epochs_done`` (a resumed run): the shuffle continues with the order of epoch ``epochs_done``, as if
    that many epochs had been drawn (each new iterator of a seeded shuffle draws the next order)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((arrays.images, arrays.labels))
    if training:
        ds = ds.shuffle(len(arrays), seed=seed, reshuffle_each_iteration=True)
        for _ in range(epochs_done):
            iter(ds)  # advances the shuffle's seed; nothing downstream (augmentation) runs
    ds = ds.batch(batch_size, drop_remainder=False)

    def to_float(images, labels):
        return tf.cast(images, tf.float32), tf.one_hot(labels, NUM_CLASSES, dtype=tf.float32)

    ds = ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
    # Augmentation and mixing map sequentially: parallel calls draw from the layers' shared random state
    # in whatever order threads run, so a seed would no longer reproduce a run. prefetch still overlaps
    # them with training, and on a batch they are vectorised (benchmarks/augment_throughput.py).
    if training and augment is not None:
        ds = ds.map(lambda x, y: (augment(x, training=True), y))
    if training and mixer is not None:
        ds = ds.map(mixer)
    return ds.prefetch(tf.data.AUTOTUNE)
