"""Data: arrays from a file or the demo generator, a stratified split, class weights, a tf.data pipeline.

Config group ``data`` (conf/data/*.yaml) maps to this package. Loading and validation use numpy only,
so bad input is reported before TensorFlow is even imported.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from bloodcell import CLASS_NAMES, NUM_CLASSES, PROJECT_ROOT
from bloodcell.core.errors import UserError
from bloodcell.core.settings import min_images
from bloodcell.data.buffers import aligned_take, host_tensor
from bloodcell.data.demo import make_demo_set
from bloodcell.data.formats import (
    open_competition_npz,
    read_folder,
    read_image,
    read_medmnist,
    read_npz,
    validate,
)

if TYPE_CHECKING:
    import tensorflow as tf

    from bloodcell.core.settings import DataSchema

T = TypeVar("T")

__all__ = [
    "Arrays",
    "Splits",
    "LabelledSet",
    "load_arrays",
    "open_arrays",
    "split_arrays",
    "split_positions",
    "cv_fold",
    "cv_positions",
    "cut",
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
    "min_images",
]

log = logging.getLogger("bloodcell.data")

FORMATS = ("npz", "folder", "medmnist", "demo")
#: train, validation, test: a stratified split wants every class in each
SPLITS = 3


@dataclass
class Arrays:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,)
    fingerprint: str = ""
    source: str = ""
    #: image files of a folder data set that could not be read and were left out (relative paths)
    skipped: list[str] = field(default_factory=list)
    #: what training learns for each image in place of its one-hot label: float (N, NUM_CLASSES) rows that
    #: sum to 1 (`bloodcell.distill`: a teacher's soft labels mixed with the truth); None = one-hot labels
    targets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Arrays:
        """Part of this set; keeps the fingerprint of the whole set it came from (a split is named by
        its source data, the seed and the fractions)."""
        targets = None if self.targets is None else self.targets[index]
        # aligned, so that TensorFlow shares the cut's memory (bloodcell.data.buffers)
        images = aligned_take(self.images, index)
        return Arrays(images, self.labels[index], self.fingerprint, self.source, targets=targets)

    def target_distributions(self) -> np.ndarray:
        """float32 (N, NUM_CLASSES): ``targets`` when set, else the one-hot labels."""
        if self.targets is not None:
            return np.asarray(self.targets, dtype=np.float32)
        return np.eye(NUM_CLASSES, dtype=np.float32)[self.labels]


@dataclass
class Splits:
    train: Arrays
    val: Arrays
    test: Arrays
    #: where each part's images ("train", "val", "test") sit in the set it was cut from: what lets two runs
    #: on the same data match their predictions image by image
    index: dict[str, np.ndarray] | None = None

    def positions(self, part: str) -> np.ndarray:
        """Positions of ``part``'s images in the set it was cut from (0..n-1 when not recorded)."""
        if self.index is not None:
            return np.asarray(self.index[part], dtype=np.int64)
        return np.arange(len(getattr(self, part)), dtype=np.int64)

    def fingerprint(self) -> str:
        """sha256 of the source data's fingerprint and which images went to which part: two runs with the
        same split fingerprint validated and were tested on exactly the same images."""
        digest = hashlib.sha256(self.train.fingerprint.encode())
        for part in ("train", "val", "test"):
            digest.update(np.ascontiguousarray(self.positions(part)).data)
            digest.update(b"|")
        return digest.hexdigest()


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the pixels, their shape and the labels: names a data set exactly, whatever its file."""
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


def load_arrays(data_cfg: DataSchema | Any) -> Arrays:
    """Load and validate the data set the ``data`` settings name (or a mapping of them, `DataSchema.of`);
    optionally subsample it (``limit``)."""
    return open_arrays(data_cfg).arrays()


@dataclass
class LabelledSet:
    """A data set whose labels are loaded and checked, and whose pixels `arrays` reads: every problem with
    the input that the labels and the file's layout show is reported before then. For an npz the pixels
    are read by one call that lets the GIL go (`formats.StoredArray.read`), as do the fingerprint and the
    cut, so `arrays` can run in a thread beside the main one (bloodcell.training.run_data)."""

    labels: np.ndarray  # int64 (N,), after data.limit
    image_shape: tuple[int, ...]  # (N, H, W, 3)
    source: str
    read_images: Callable[[], np.ndarray]
    skipped: list[str] = field(default_factory=list)
    #: which of the images read ``labels`` belong to (data.limit), None for all of them
    keep: np.ndarray | None = None

    def arrays(self) -> Arrays:
        """The pixels read, kept (data.limit) and fingerprinted, with the labels: the `Arrays`."""
        images = self.read_images()
        if self.keep is not None:
            images = aligned_take(images, self.keep)
        return Arrays(images, self.labels, fingerprint(images, self.labels), self.source, self.skipped)


def open_arrays(data_cfg: DataSchema | Any) -> LabelledSet:
    """The data set the ``data`` settings name, its labels loaded and checked (`LabelledSet`); an npz's pixels
    are read later, by `LabelledSet.arrays`, the other formats' now."""
    from bloodcell.core.settings import DataSchema

    data = DataSchema.of(data_cfg)
    fmt = data.format
    skipped: list[str] = []
    if fmt == "npz":
        path = resolve_path(_needed(data.path, "path", fmt))
        npz = open_competition_npz(path)
        labels, shape, read_images = npz.labels, npz.image_shape, npz.read_images
        source = str(path)
    else:
        if fmt == "folder":
            path = resolve_path(_needed(data.path, "path", fmt))
            images, labels, skipped = read_folder(path, strict=data.strict)
            source = str(path)
        elif fmt == "medmnist":
            local = resolve_path(data.path) if data.path else None
            size = int(_needed(data.size, "size", fmt))
            images, labels = read_medmnist(size, local, resolve_path(data.cache_dir))
            source = str(local or f"bloodmnist_{size}")
        elif fmt == "demo":
            per_class, side = (
                _needed(data.per_class, "per_class", fmt),
                _needed(data.image_size, "image_size", fmt),
            )
            images, labels = make_demo_set(int(per_class), int(side), int(data.demo_seed))
            source = f"demo (synthetic, {per_class} per class, {side}px)"
        else:
            raise UserError(f"data.format={fmt!r} is unknown; use one of {', '.join(FORMATS)}")
        shape, read_images = images.shape, lambda: images
    keep = None
    limit = data.limit
    if limit and limit < len(labels):
        keep = np.sort(subset_index(labels, int(limit)))
        labels, shape = labels[keep], (len(keep), *shape[1:])
        source = f"{source} (data.limit={limit})"
    check_classes(labels, source)
    return LabelledSet(labels, tuple(shape), source, read_images, skipped, keep)


def _needed(value: T | None, key: str, fmt: str) -> T:
    """A key the data's format needs, which a mapping made by code (`DataSchema.of`) may have left out."""
    if value is None:
        raise UserError(f"data.{key} is not set; data={fmt} needs it (conf/data/{fmt}.yaml has one)")
    return value


def subset_index(labels: np.ndarray, size: int) -> np.ndarray:
    """``size`` indices of ``labels``, stratified when scikit-learn can (every class twice, both parts at
    least one per class), else drawn at random; the same for the same labels."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    classes = int((counts > 0).sum())
    stratify = counts[counts > 0].min() >= 2 and min(size, len(labels) - size) >= classes
    keep, _ = train_test_split(
        np.arange(len(labels)), train_size=size, random_state=0, stratify=labels if stratify else None
    )
    return keep


def check_classes(labels: np.ndarray, source: str) -> None:
    """A classifier needs two classes at least: fewer is a UserError. A class with no image is a
    warning that names it (the model keeps 8 outputs; that class is never learned nor tested)."""
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    present = [CLASS_NAMES[c] for c in range(NUM_CLASSES) if counts[c]]
    if len(present) < 2:
        raise UserError(
            f"{source}: all {len(labels)} images are of one class ({', '.join(present)}); a classifier "
            f"needs images of at least 2 classes (ids 0-{NUM_CLASSES - 1}); check the labels"
        )
    missing = [CLASS_NAMES[c] for c in range(NUM_CLASSES) if not counts[c]]
    if missing:
        log.warning(
            "%s: no images of %s: training goes on with the %d other classes; the model keeps its %d "
            "outputs but never learns those, and they are missing from the test metrics",
            source, ", ".join(missing), len(present), NUM_CLASSES,
        )  # fmt: skip


def split_arrays(arrays: Arrays, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Stratified train / validation / test split of ``arrays``, reproducible by ``seed``
    (`split_positions`)."""
    return cut(arrays, split_positions(arrays.labels, arrays.source, val_fraction, test_fraction, seed))


def split_positions(
    labels: np.ndarray, source: str, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Where a stratified train / validation / test split, reproducible by ``seed``, puts each image: its
    positions per part ("train", "val", "test"), from the labels alone. A class with fewer images than there
    are parts (1 or 2) cannot be in all three: its images go to training (with a warning that names it),
    and the other classes are split as usual."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels, minlength=NUM_CLASSES)
    rare = [c for c in range(NUM_CLASSES) if 0 < counts[c] < SPLITS]
    index = np.arange(len(labels))
    train_only = np.isin(labels, rare)
    if rare:
        log.warning(
            "%s: too few images for a stratified split of %s (%s; each part needs one): they all go "
            "to the training split, so validation and test have none of %s",
            source,
            ", ".join(CLASS_NAMES[c] for c in rare),
            ", ".join(f"{CLASS_NAMES[c]} {counts[c]}" for c in rare),
            "that class" if len(rare) == 1 else "those classes",
        )
    split = index[~train_only]
    classes = len(np.unique(labels[split]))
    needed = min_images(classes, val_fraction, test_fraction)
    if len(split) < needed:
        raise UserError(
            f"{source}: {len(split)} images of {classes} classes cannot be split into train / "
            f"validation / test with data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: "
            f"a stratified split needs at least {needed}; use more data (raise data.limit or set it to null)"
        )
    try:
        rest, test = train_test_split(
            split, test_size=test_fraction, random_state=seed, stratify=labels[split]
        )
        val_share = val_fraction / (1 - test_fraction)
        train, val = train_test_split(rest, test_size=val_share, random_state=seed, stratify=labels[rest])
    except ValueError as err:
        raise UserError(
            f"cannot split {len(labels)} samples into train/val/test ({err}); "
            "use more data or smaller data.val_fraction / data.test_fraction"
        ) from None
    return {"train": np.concatenate([train, index[train_only]]), "val": val, "test": test}


def cv_fold(arrays: Arrays, splits: Splits, folds: int, fold: int, seed: int) -> Splits:
    """Fold ``fold`` (0-based) of a stratified ``folds``-fold cross-validation of ``splits``' train +
    validation pool, cut from ``arrays`` (`cv_positions`); the test split is the one of ``splits``."""
    split = {part: splits.positions(part) for part in ("train", "val", "test")}
    positions = cv_positions(arrays.labels, arrays.source, split, folds, fold, seed)
    return Splits(arrays.subset(positions["train"]), arrays.subset(positions["val"]), splits.test, positions)


def cv_positions(
    labels: np.ndarray, source: str, split: dict[str, np.ndarray], folds: int, fold: int, seed: int
) -> dict[str, np.ndarray]:
    """Positions per part of fold ``fold`` (0-based) of a stratified ``folds``-fold cross-validation
    (scikit-learn's StratifiedKFold, shuffled by ``seed``) of the train + validation pool of ``split``
    (`split_positions`): that fold validates, the other folds train. The test part is ``split``'s,
    untouched: it stays held out from every fold, and the folds of one seed are disjoint and cover the
    pool."""
    from sklearn.model_selection import StratifiedKFold

    if folds < 2 or not 0 <= fold < folds:
        raise UserError(f"data.cv.fold={fold} is not one of 0..{folds - 1} (data.cv.folds={folds})")
    pool = np.sort(np.concatenate([split["train"], split["val"]]))
    counts = np.bincount(labels[pool], minlength=NUM_CLASSES)
    if counts.max() < folds:
        raise UserError(
            f"{source}: no class has {folds} images outside the test split, too few for "
            f"data.cv.folds={folds}; use fewer folds or more data"
        )
    # a class with fewer images than folds is missing from some folds' validation (scikit-learn warns)
    kfold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    train, val = list(kfold.split(pool, labels[pool]))[fold]
    return {"train": pool[train], "val": pool[val], "test": split["test"]}


def cut(arrays: Arrays, positions: dict[str, np.ndarray]) -> Splits:
    """The parts of ``arrays`` at ``positions`` (`split_positions`, `cv_positions`)."""
    train, val, test = (arrays.subset(positions[part]) for part in ("train", "val", "test"))
    return Splits(train, val, test, positions)


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
    epoch: tf.Variable | None = None,
) -> tf.data.Dataset:
    """(float32 pixels 0-255, float32 targets) batches: the one-hot labels, or ``arrays.targets`` when
    set (`Arrays.target_distributions`). Shuffling, ``augment`` (a Keras layer
    called with training=True) and ``mixer`` (batch-level MixUp/CutMix) apply to training batches only.
    Pixels stay uint8 until batched: a quarter of the memory traffic of float32 slices.

    ``epoch`` (an int64 variable the trainer sets at the start of every epoch, `callbacks.EpochOrder`): each
    epoch's order is a permutation drawn from (seed, epoch) alone, so a resumed run sees the order of the
    epoch it resumes at. Without it, a seeded shuffle draws the next order for every iterator Keras makes,
    and Keras makes more than one per epoch."""
    import tensorflow as tf

    if training and epoch is not None:
        count = len(arrays)

        def epoch_order(_: tf.Tensor) -> tf.data.Dataset:
            key = tf.stack([tf.constant(seed, tf.int64), epoch.read_value()])
            return tf.data.Dataset.from_tensor_slices(
                tf.random.experimental.stateless_shuffle(tf.range(count), key)
            )

        # over the same memory as the arrays (bloodcell.data.buffers): the pipeline holds no second copy
        images, targets = host_tensor(arrays.images), host_tensor(arrays.target_distributions())
        order = tf.data.Dataset.from_tensors(0).flat_map(epoch_order)
        ds = order.apply(tf.data.experimental.assert_cardinality(count))
        ds = ds.batch(batch_size).map(lambda i: (tf.gather(images, i), tf.gather(targets, i)))
    else:
        images, targets = host_tensor(arrays.images), host_tensor(arrays.target_distributions())
        ds = tf.data.Dataset.from_tensor_slices((images, targets))
        if training:
            ds = ds.shuffle(len(arrays), seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size, drop_remainder=False)

    def to_float(images: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.cast(images, tf.float32), targets

    ds = ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
    # Augmentation and mixing map sequentially: parallel calls draw from the layers' shared random state
    # in whatever order threads run, so a seed would no longer reproduce a run. prefetch still overlaps
    # them with training, and on a batch they are vectorised (benchmarks/augment_throughput.py).
    if training and augment is not None:
        ds = ds.map(lambda x, y: (augment(x, training=True), y))
    if training and mixer is not None:
        ds = ds.map(mixer)
    return ds.prefetch(tf.data.AUTOTUNE)
