"""A run's data: the arrays as loaded and validated, cleaned when ``data.clean`` (cached), the stratified
split (or one cross-validation fold), distillation targets; and the same splits rebuilt later from a
finished run's logged config (`run_splits`), so that compare, ensemble and distill judge on its images.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from bloodcell import PROJECT_ROOT
from bloodcell.core.errors import UserError
from bloodcell.core.settings import DataSchema, TrainSchema

if TYPE_CHECKING:
    import numpy as np

    from bloodcell.data import Arrays, Splits
    from bloodcell.data.cleaning import CleaningResult
log = logging.getLogger("bloodcell.train")


CLEANING_CACHE = PROJECT_ROOT / "mlruns" / "cleaning_cache"


@dataclass
class Targets:
    """What a training split learns in place of its one-hot labels (`bloodcell.distill`: a teacher's soft
    labels mixed with the truth), and what the run records about where they came from."""

    train: np.ndarray  # float (len(splits.train), NUM_CLASSES), rows summing to 1, in the split's order
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RunData:
    """The data of one run: the arrays as loaded, the splits actually used, and the cleaning result."""

    arrays: Arrays
    splits: Splits
    cleaning: CleaningResult | None = None
    #: what the training split learns when not its one-hot labels (`use_targets`)
    targets: Targets | None = None

    def use_targets(self, targets: Targets) -> None:
        self.targets = targets
        self.splits.train.targets = targets.train

    def tags(self) -> dict[str, str]:
        tags = {
            "data_fingerprint": self.arrays.fingerprint,
            "data_source": self.arrays.source,
            # which images went to validation and test: runs that share it can be compared image by image
            "split_fingerprint": self.splits.fingerprint(),
        }
        if (
            self.cleaning is not None
        ):  # every split carries the fingerprint of the cleaned set it was cut from
            tags["data_fingerprint_cleaned"] = self.splits.train.fingerprint
        if self.targets is not None:  # where the targets came from (a teacher) is part of what trains
            tags |= self.targets.tags
        return tags


def load_splits(data: DataSchema, seed: int, cleaning_cfg: dict[str, Any] | None = None) -> RunData:
    """Validated arrays, cleaned when ``data.clean`` (by ``cleaning_cfg``, the ``cleaning`` group; cached by
    data fingerprint and cleaning settings, so a sweep cleans once), then the stratified split (seeded by
    ``data.split_seed``, or ``seed`` when that is null)."""
    return start_loading(data, seed, cleaning_cfg).result()


def start_loading(data: DataSchema, seed: int, cleaning_cfg: dict[str, Any] | None = None) -> Future[RunData]:
    """`load_splits`, with the bulk of the work left to a background thread: what is wrong with the input
    (file, labels, a split that cannot be made) is raised here, from the labels alone; reading the pixels,
    their fingerprint and cutting the parts run in a thread (``.result()`` waits for them and raises what
    they found, a damaged file). Those calls let go of Python's lock (the GIL) while they run, so a run
    imports TensorFlow meanwhile (`bloodcell.training.recipe.train`): 1-2 s less per run on the shared
    cells."""
    from bloodcell.data import cut, cv_positions, open_arrays, split_positions

    labelled = open_arrays(data)
    # one worker: each task starts when the one before it is done. No task imports anything (all imported
    # here), so nothing races the main thread's imports.
    reader = ThreadPoolExecutor(1, thread_name_prefix="bloodcell-data")
    try:
        loaded = reader.submit(labelled.arrays)
        labels, source = labelled.labels, labelled.source
        kept, cleaning = None, None
        if data.clean:  # the cleaner looks at every image before the split
            kept, cleaning = cleaned(loaded.result(), cleaning_cfg)
            labels, source = kept.labels, kept.source
        # data.split_seed (null = seed): repeats of a sweep trial vary the seed but keep the split
        split_seed = seed if data.split_seed is None else data.split_seed
        positions = split_positions(labels, source, data.val_fraction, data.test_fraction, split_seed)
        cv = data.cv
        if cv is not None and cv.fold is not None:  # one fold of a cross-validation (training.repeats: all)
            assert cv.folds is not None  # checked: a fold needs folds
            positions = cv_positions(labels, source, positions, cv.folds, cv.fold, split_seed)
        log.info(
            "data: %s, %d images %s -> train %d / val %d / test %d",
            labelled.source,
            len(labelled.labels),
            labelled.image_shape[1:],
            *(len(positions[part]) for part in ("train", "val", "test")),
        )

        def split() -> RunData:
            arrays = loaded.result()
            return RunData(arrays, cut(arrays if kept is None else kept, positions), cleaning)

        return reader.submit(split)
    finally:
        reader.shutdown(wait=False)  # the thread ends after its last task


def cleaned(arrays: Arrays, cleaning_cfg: dict[str, Any] | None) -> tuple[Arrays, CleaningResult]:
    """``arrays`` without the images the cleaner finds unwanted (cached by data fingerprint and cleaning
    settings, so a sweep cleans once), fingerprinted anew, and the cleaner's result."""
    from bloodcell.data import Arrays, fingerprint
    from bloodcell.data.cleaning import find_unwanted_cached, summary

    cleaning, cached = find_unwanted_cached(
        arrays.images, arrays.labels, cleaning_cfg, arrays.fingerprint, CLEANING_CACHE
    )
    log.info("cleaning%s: %s", " (cached)" if cached else "", summary(cleaning))
    images, labels = arrays.images[cleaning.keep], arrays.labels[cleaning.keep]
    return Arrays(images, labels, fingerprint(images, labels), f"{arrays.source} (cleaned)"), cleaning


def run_config(run: Any) -> DictConfig:
    """The resolved config a run logged (``config.yaml``); raises UserError when it has none."""
    import mlflow
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.create(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml"))
    except Exception as err:
        raise UserError(f"run {run.info.run_id} has no config.yaml to load its data from ({err})") from None
    if not isinstance(cfg, DictConfig):
        raise UserError(f"run {run.info.run_id}'s config.yaml is not a mapping")
    return cfg


def logged_settings(run: Any) -> TrainSchema:
    """The settings a finished run trained with, from the config it logged (`run_config`). Not checked
    again (they were, when it trained), and read over today's defaults (`TrainSchema.of`): a run logged
    before a key existed (data.split_seed, data.cv, data.strict, cleaning, ...) trained as that key's
    default says, except data.split_seed: runs before it was fixed (issue 27) were split by their seed.
    The one place an older logged config is tolerated."""
    from omegaconf import open_dict

    cfg = run_config(run)
    if "data" in cfg and "split_seed" not in cfg.data:
        with open_dict(cfg):
            cfg.data.split_seed = None
    return TrainSchema.of(cfg)


def run_splits(run: Any) -> RunData:
    """A run's data and splits, loaded again from its config and checked against its split fingerprint;
    raises UserError when they cannot be had."""
    settings = logged_settings(run)
    data = load_splits(settings.data, settings.seed, settings.cleaning)
    if data.splits.fingerprint() != run.data.tags.get("split_fingerprint"):
        raise UserError(
            f"the data of run {run.info.run_id} ({data.arrays.source}) has changed since it trained"
        )
    return data


def split_images(run: Any, split: str, data_index: np.ndarray) -> np.ndarray:
    """The images at ``data_index`` of a run's data, loaded again from its config (``config.yaml``) and
    checked against its split fingerprint; raises UserError when they cannot be had."""
    data = run_splits(run)
    part = getattr(data.splits, split)
    where = {int(d): i for i, d in enumerate(data.splits.positions(split))}
    return part.images[[where[int(d)] for d in data_index]]


def labelled_images(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of an npz (``images``, ``labels``) or a folder with one sub-folder per class,
    read and validated as training data is."""
    from bloodcell.data import load_arrays, resolve_path

    where = resolve_path(path)
    if not where.exists():
        raise UserError(
            f"eval={path} not found; give a labelled .npz or a folder with one sub-folder per class"
        )
    fmt = "folder" if where.is_dir() else "npz"
    arrays = load_arrays(DataSchema.of({"format": fmt, "path": str(where)}))
    return arrays.images, arrays.labels
