"""`python -m bloodcell.train`: one tracked, two-phase training run, composed by Hydra.

    python -m bloodcell.train +experiment=quickstart            # built-in demo data, CPU, minutes
    python -m bloodcell.train +experiment=effnetb2              # the reference recipe
    python -m bloodcell.train -m +sweeps=quick                  # an Optuna sweep (sweeps/quick.yaml)

``train(cfg)`` is the recipe as a list of named steps: load splits -> start run -> build -> fit phase 1
-> fit phase 2 -> evaluate -> record. Each step is a function of its own; what a run records goes
through `bloodcell.tracking`, the Keras callbacks live in `bloodcell.callbacks`. It returns the
objective (best epoch's ``cfg.objective``) for a sweeper.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from bloodcell import NUM_CLASSES, PROJECT_ROOT, checkpoints, phase1_cache, tracking
from bloodcell.cli import run_or_exit
from bloodcell.errors import UserError
from bloodcell.resume import Resume, config_digest, find_resumable
from bloodcell.stats import interval_names

if TYPE_CHECKING:
    import keras
    import numpy as np
    import tensorflow as tf

    from bloodcell.callbacks import (
        Checkpoint,
        EpochLogger,
        EpochOrder,
        OptunaPruning,
        PreciseBatchNorm,
        ResumableEarlyStopping,
        TimeLimit,
        WeightAverage,
    )
    from bloodcell.clean import CleaningResult
    from bloodcell.data import Arrays, Splits
    from bloodcell.evaluate import Evaluation

log = logging.getLogger("bloodcell.train")

#: trainer.mixed_precision values and the Keras dtype policy each sets (true = mixed_float16, the usual one)
PRECISION_POLICIES = {
    False: None,
    True: "mixed_float16",
    "mixed_float16": "mixed_float16",
    "mixed_bfloat16": "mixed_bfloat16",
}

CLEANING_CACHE = PROJECT_ROOT / "mlruns" / "cleaning_cache"


# ---- checks before anything starts ----------------------------------------------------------------------


def precision_policy(trainer_cfg: Any) -> str | None:
    """The Keras dtype policy ``trainer.mixed_precision`` asks for (checked by `check_config`); None keeps
    float32. bfloat16 needs no loss scaling and on Hopper/Ampere GPUs beat float16 (README)."""
    value = trainer_cfg.get("mixed_precision")
    return None if value is None else PRECISION_POLICIES[value]


def check_config(cfg: DictConfig) -> None:
    """Every value of the config within its domain (bloodcell.config_schema, one model per config group),
    before any data is read, any MLflow run started or TensorFlow imported: a typo costs a second."""
    from bloodcell.config_schema import check_train_config

    check_train_config(cfg)


# ---- step 1: data ----------------------------------------------------------------------------------------


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


def load_splits(cfg: DictConfig) -> RunData:
    """Validated arrays, cleaned when ``data.clean`` (cached by data fingerprint and cleaning settings, so
    a sweep cleans once), then the stratified split."""
    from bloodcell.data import Arrays, cv_fold, fingerprint, load_arrays, split_arrays

    arrays = load_arrays(cfg.data)
    cleaning = None
    kept = arrays
    if cfg.data.get("clean"):
        from bloodcell.clean import find_unwanted_cached, summary

        cleaning, cached = find_unwanted_cached(
            arrays.images, arrays.labels, cfg.cleaning, arrays.fingerprint, CLEANING_CACHE
        )
        log.info("cleaning%s: %s", " (cached)" if cached else "", summary(cleaning))
        images, labels = arrays.images[cleaning.keep], arrays.labels[cleaning.keep]
        kept = Arrays(images, labels, fingerprint(images, labels), f"{arrays.source} (cleaned)")
    # data.split_seed (null = seed): repeats of a sweep trial vary the seed but keep the split
    split_seed = cfg.data.get("split_seed")
    split_seed = cfg.seed if split_seed is None else int(split_seed)
    splits = split_arrays(kept, cfg.data.val_fraction, cfg.data.test_fraction, split_seed)
    cv = cfg.data.get("cv") or {}
    if cv.get("fold") is not None:  # one fold of a cross-validation (bloodcell.repeats runs them all)
        splits = cv_fold(kept, splits, int(cv["folds"]), int(cv["fold"]), split_seed)
    log.info(
        "data: %s, %d images %s -> train %d / val %d / test %d",
        arrays.source,
        len(arrays),
        arrays.images.shape[1:],
        len(splits.train),
        len(splits.val),
        len(splits.test),
    )
    return RunData(arrays, splits, cleaning)


# ---- step 2: the MLflow run: a new one, or the one to continue -------------------------------------------


@dataclass
class CheckpointDirs:
    """Where a run's checkpoints go (``<root>/<run id>``) and when they are deleted: when the run finishes
    or is pruned (nothing left to resume), unless ``trainer.checkpoint.keep_after_finish``."""

    root: Path
    keep_after_finish: bool = False

    @contextlib.contextmanager
    def checkpointing(self, run_id: str) -> Iterator[Path]:
        import optuna

        try:
            yield self.root / run_id
        except optuna.TrialPruned:
            checkpoints.delete(self.root / run_id)
            raise

    def finished(self, run_id: str) -> None:
        """The run ended: its checkpoints go (unless kept); the folder stays while records wait for the
        tracking server in its outbox (they need the saved model)."""
        if self.keep_after_finish:
            return
        if tracking.outbox_waiting(self.root / run_id):
            checkpoints.delete_epochs(self.root / run_id)
        else:
            checkpoints.delete(self.root / run_id)


def start_or_resume(cfg: DictConfig, data: RunData) -> tuple[str, Resume | None, CheckpointDirs]:
    """The MLflow experiment, the run to continue (``trainer.resume``, or a sweep trial that a killed sweep
    left unfinished; None for a new run), and where the run's checkpoints go."""
    experiment_id = tracking.setup_experiment(cfg.tracking)
    dirs = CheckpointDirs(
        checkpoints.root_for(tracking.resolve_tracking_uri(cfg.tracking), cfg.trainer.checkpoint.get("dir")),
        bool(cfg.trainer.checkpoint.get("keep_after_finish")),
    )
    tracking.send_waiting(dirs.root)  # what earlier runs here could not send to the server
    resume = find_resumable(cfg, experiment_id, data.arrays.fingerprint, dirs.root)
    if resume is not None:
        log.info(
            "resuming run %s after epoch %d (%s)",
            resume.run_id,
            resume.checkpoint.epoch,
            resume.checkpoint.state["phase"],
        )
    return experiment_id, resume, dirs


# ---- step 3: devices and the model -------------------------------------------------------------------------


def distribution_strategy(trainer_cfg: Any) -> tf.distribute.Strategy:
    """Sets the dtype policy (``trainer.mixed_precision``) and returns the strategy
    (``trainer.distribute``: one device, or MirroredStrategy over all visible GPUs)."""
    import keras
    import tensorflow as tf

    policy = precision_policy(trainer_cfg)
    if policy:
        keras.mixed_precision.set_global_policy(policy)
    return (
        tf.distribute.MirroredStrategy()
        if trainer_cfg.distribute == "mirrored"
        else tf.distribute.get_strategy()
    )


@dataclass
class Setup:
    """What both phases train: the model that is saved, the model that is fitted (the same, or augmentation
    + model when augmentation runs inside the model), its backbone, and the input pipelines."""

    model: keras.Model
    trainable_model: keras.Model
    backbone: keras.Model
    train_ds: tf.data.Dataset
    val_ds: tf.data.Dataset
    batch_size: int
    strategy: tf.distribute.Strategy
    class_weight: dict[int, float] | None
    #: Keras layers of the input pipeline (augmentation, MixUp/CutMix) whose random state a checkpoint keeps
    random_layers: list[keras.Layer] = field(default_factory=list)
    #: the epoch whose data order the training pipeline draws (set by callbacks.EpochOrder)
    epoch: tf.Variable | None = None
    #: switches the training pipeline to ``finetune.augmentation_strength`` (None: phase 2 keeps phase 1's)
    phase2_augmentation: Callable[[], None] | None = None


def build(cfg: DictConfig, splits: Splits, strategy: tf.distribute.Strategy, resumed: bool = False) -> Setup:
    """Augmentation and input pipelines, then the model with its backbone frozen as phase 1 wants it.
    The training order of each epoch depends on the seed and the epoch only, so a resumed run continues it."""
    import keras
    import tensorflow as tf

    from bloodcell import augment, finetune
    from bloodcell.augment.pipeline import strength_of
    from bloodcell.data import class_weights, make_tf_dataset
    from bloodcell.models import BACKBONE_LAYER, batchnorm_frozen, build_model

    # seeded here, after the MLflow run started: MLflow draws its friendly run names from Python's `random`
    keras.utils.set_random_seed(cfg.seed)
    in_model = cfg.augmentation.get("where", "pipeline") == "model"
    batch = cfg.trainer.batch_size * strategy.num_replicas_in_sync
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_epoch")

    def training_pipeline(aug_cfg: Any) -> tuple[Any, Any, tf.data.Dataset, list[keras.Layer]]:
        """The augmentation and mixer at ``aug_cfg``, the training pipeline (which applies the augmentation
        unless it runs in the model), and the Keras layers whose random state a checkpoint keeps."""
        with strategy.scope():  # in the model its seed variables must live on the training devices
            augmentation = augment.build_augmentation(aug_cfg, cfg.seed)
        mixer = augment.build_mixer(aug_cfg, NUM_CLASSES, cfg.seed)
        in_pipeline = None if in_model else augmentation
        train_ds = make_tf_dataset(
            splits.train, batch, training=True, seed=cfg.seed, augment=in_pipeline, mixer=mixer, epoch=epoch
        )
        random_layers = [layer for layer in (in_pipeline, mixer) if isinstance(layer, keras.Layer)]
        return augmentation, mixer, train_ds, random_layers

    augmentation, mixer, train_ds, random_layers = training_pipeline(cfg.augmentation)
    val_ds = make_tf_dataset(splits.val, batch, training=False, seed=cfg.seed)
    if augmentation is not None and not resumed:  # a resumed run has its preview already
        grid = augment.preview_grid(
            splits.train.images[:6],
            augmentation,
            views=5,
            seed=cfg.seed,
            mixer=mixer,
            labels=splits.train.labels[:6],
        )
        tracking.log_augmentation_preview(grid)

    with strategy.scope():
        model = build_model(cfg, splits.train.images.shape[1:])
        # With augmentation inside the model it runs on the accelerator; only `model` (without it) is saved,
        # so the logged model needs neither bloodcell nor KerasCV to load.
        trainable_model = keras.Sequential([augmentation, model]) if in_model and augmentation else model
        backbone = model.get_layer(BACKBONE_LAYER)
        finetune.set_backbone_trainable(
            backbone, not finetune.freeze_backbone_in_phase1(cfg), keep_batchnorm_frozen=batchnorm_frozen(cfg)
        )
    weights = class_weights(splits.train.labels) if cfg.trainer.class_weight == "balanced" else None
    setup = Setup(
        model, trainable_model, backbone, train_ds, val_ds, batch, strategy, weights, random_layers, epoch
    )
    strength2 = cfg.finetune.get("augmentation_strength")
    if strength2 is not None and float(strength2) != strength_of(cfg.augmentation):

        def phase2_augmentation() -> None:
            """The same pipeline at phase 2's strength (its own random state, seeded as phase 1's was).
            Phase 1 never sees it: a study can search it and still reuse phase 1 (bloodcell.phase1_cache)."""
            from omegaconf import OmegaConf

            aug_cfg = OmegaConf.merge(cfg.augmentation, {"strength": float(strength2)})
            augmentation, _, setup.train_ds, setup.random_layers = training_pipeline(aug_cfg)
            if in_model:
                with strategy.scope():
                    setup.trainable_model = keras.Sequential([augmentation, model]) if augmentation else model

        setup.phase2_augmentation = phase2_augmentation
    return setup


# ---- step 4: the two phases -------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """One call of Keras' fit: its length, optimizer schedule and early-stopping patience."""

    name: str
    epochs: int
    lr: float
    lr_decay_steps: int
    lr_decay_rate: float
    patience: int
    #: the optimizer's moving average of the weights (``trainer.ema``, both phases); None = off
    ema_momentum: float | None = None

    @classmethod
    def first(cls, cfg: DictConfig) -> Phase:
        """Phase 1: the head (and a randomly initialised backbone) at ``trainer.lr``."""
        t = cfg.trainer
        return cls(
            "phase1", t.epochs, t.lr, t.lr_decay_steps, t.lr_decay_rate, t.early_stopping_patience, ema(cfg)
        )

    @classmethod
    def second(cls, cfg: DictConfig) -> Phase:
        """Phase 2: fine-tuning the top of the backbone at ``finetune.lr``."""
        f = cfg.finetune
        return cls(
            "phase2", f.epochs, f.lr, f.lr_decay_steps, f.lr_decay_rate, f.early_stopping_patience, ema(cfg)
        )


def ema(cfg: DictConfig) -> float | None:
    """``trainer.ema_momentum`` when ``trainer.ema`` is on, else None."""
    return float(cfg.trainer.ema_momentum) if cfg.trainer.get("ema") else None


@dataclass
class RunCallbacks:
    """The callbacks both phases share: precise BN, the epoch logger (whose history the run reads), the
    time limit, the checkpoint and the Optuna pruner; early stopping is made per phase (its patience
    differs). Also what a checkpoint saves of the run's progress (`snapshot`)."""

    setup: Setup
    epoch_log: EpochLogger
    precise_bn: PreciseBatchNorm | None
    time_limit: TimeLimit | None
    checkpoint: Checkpoint | None
    pruner: OptunaPruning | None
    stopping: ResumableEarlyStopping | None = None
    order: EpochOrder | None = None
    phase: str = "phase1"
    #: phase 1's outcome, kept while phase 2 runs: it is what phase 2 must beat
    phase1_epochs: int | None = None
    phase1_best: float | None = None
    phase1_weights: list[np.ndarray] | None = None
    #: stochastic weight averaging over phase 2's last epochs (``finetune.swa``); None = off
    averaging: WeightAverage | None = None

    @classmethod
    def for_run(
        cls, cfg: DictConfig, setup: Setup, train_images: np.ndarray, run_dir: Path | None
    ) -> RunCallbacks:
        from bloodcell.callbacks import (
            Checkpoint,
            EpochLogger,
            EpochOrder,
            PreciseBatchNorm,
            TimeLimit,
            WeightAverage,
        )
        from bloodcell.trial import pruning_callback

        precise_bn = PreciseBatchNorm.for_model(
            setup.model, train_images, cfg.head.get("precise_bn_images") or 0, cfg.seed, setup.batch_size
        )
        minutes = cfg.trainer.get("time_limit_minutes")
        time_limit = TimeLimit(60 * minutes) if minutes else None
        every = int(cfg.trainer.checkpoint.every) if run_dir is not None else 0
        epoch_log = EpochLogger(images_per_epoch=len(train_images))
        callbacks = cls(setup, epoch_log, precise_bn, time_limit, None, pruning_callback(cfg))
        callbacks.order = EpochOrder(setup.epoch) if setup.epoch is not None else None
        if cfg.finetune.get("swa"):
            callbacks.averaging = WeightAverage(int(cfg.finetune.swa_epochs))
        if every > 0:
            callbacks.checkpoint = Checkpoint(
                run_dir, callbacks.snapshot, every, int(cfg.trainer.checkpoint.keep)
            )
        return callbacks

    def for_phase(
        self, phase: Phase, resumed: checkpoints.Checkpoint | None = None
    ) -> list[keras.callbacks.Callback]:
        import keras

        from bloodcell.callbacks import ResumableEarlyStopping

        self.phase = phase.name
        self.stopping = ResumableEarlyStopping(
            monitor="val_accuracy",
            patience=phase.patience,
            restore_best_weights=True,
            verbose=1,
            resume_from=resumed.state["early_stopping"] if resumed else None,
            best_weights=(resumed.arrays.get("best_weights") or None) if resumed else None,
            ema=phase.ema_momentum is not None,
        )
        # With EMA, validation scores the averaged weights (swapped in before precise BN, so that its
        # statistics are theirs, and out again before the epoch ends: training and the checkpoint go on with
        # the raw ones); early stopping keeps the averaged weights of the best epoch.
        swap = keras.callbacks.SwapEMAWeights() if phase.ema_momentum is not None else None
        averaging = self.averaging if phase.name == "phase2" else None
        # precise BN first: its statistics are what validation sees; the checkpoint after the stoppers (their
        # decisions are part of it) and before the epoch is recorded or reported (see callbacks.Checkpoint)
        ordered = [
            swap,
            self.precise_bn,
            self.stopping,
            self.time_limit,
            averaging,
            self.checkpoint,
            self.epoch_log,
            self.pruner,
        ]
        return [callback for callback in ordered if callback is not None]

    def out_of_time(self) -> bool:
        return self.time_limit is not None and self.time_limit.expired()

    def snapshot(self, epoch: int, logs: dict[str, Any] | None) -> checkpoints.Checkpoint:
        """This epoch's state, for `bloodcell.checkpoints`."""
        from bloodcell.callbacks import epoch_record

        model, setup = self.setup.trainable_model, self.setup
        assert self.stopping is not None
        state = {
            "epoch": epoch,
            "phase": self.phase,
            "stopped": bool(model.stop_training),
            "early_stopping": self.stopping.state(),
            "time_spent": self.time_limit.spent() if self.time_limit else None,
            "phase1_epochs": self.phase1_epochs,
            "phase1_best": self.phase1_best,
            "history": [
                *self.epoch_log.history,
                epoch_record(epoch, logs, model, self.epoch_log.images_per_second()),
            ],
        }
        arrays = {
            "variables": [v.numpy() for v in model.variables],
            "optimizer": [v.numpy() for v in model.optimizer.variables],
            "random": [v.numpy() for layer in setup.random_layers for v in layer.variables],
            "best_weights": list(self.stopping.best_weights or []),
            "phase1_weights": list(self.phase1_weights or []),
            "swa": self.averaging.flat() if self.averaging is not None else [],
        }
        return checkpoints.Checkpoint(state, arrays)

    def resume_from(self, run_id: str, saved: checkpoints.Checkpoint) -> None:
        """Put the model, its optimizer, the pipeline's random state and every callback back where the
        checkpoint was, and record the checkpoint's epoch where MLflow or Optuna missed it."""
        model, state = self.setup.trainable_model, saved.state
        with self.setup.strategy.scope():
            model.optimizer.build(model.trainable_variables)
        parts = [
            ("variables", model.variables),
            ("optimizer", model.optimizer.variables),
            ("random", [v for layer in self.setup.random_layers for v in layer.variables]),
        ]
        for group, variables in parts:
            values = saved.arrays.get(group, [])
            if len(values) != len(variables):
                raise UserError(
                    f"the checkpoint in {saved.path} does not fit this model ({group}: {len(values)} arrays "
                    f"saved, {len(variables)} now): the config changed; start a new run"
                )
            for variable, value in zip(variables, values):
                variable.assign(value)
        self.phase1_epochs, self.phase1_best = state["phase1_epochs"], state["phase1_best"]
        self.phase1_weights = saved.arrays.get("phase1_weights") or None
        if self.averaging is not None:
            self.averaging.restore(saved.arrays.get("swa", []), len(model.trainable_weights))
        if self.time_limit is not None and state.get("time_spent") is not None:
            self.time_limit.already_spent(float(state["time_spent"]))
        *earlier, last = state["history"]
        self.epoch_log.history = list(earlier)
        if saved.epoch not in tracking.logged_steps(run_id, "val_accuracy"):
            self.epoch_log.record(
                last
            )  # killed after the checkpoint was written, before MLflow had the epoch
        else:
            self.epoch_log.history.append(last)
        if self.pruner is not None:
            self.pruner.resume_after(saved.epoch, last)


def compile_for(setup: Setup, phase: Phase, trainer: DictConfig) -> None:
    """A fresh optimizer for the phase (Adam on an exponentially decaying learning rate); ``trainer`` gives
    the label smoothing and whether Keras traces its steps (``trainer.run_eagerly``)."""
    import keras

    from bloodcell.finetune import optimizer

    with setup.strategy.scope():
        setup.trainable_model.compile(
            optimizer=optimizer(phase.lr, phase.lr_decay_steps, phase.lr_decay_rate, phase.ema_momentum),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=trainer.label_smoothing),
            metrics=["accuracy"],
            run_eagerly=trainer.run_eagerly,
        )


def keras_verbose(setting: Any, stream: Any = None) -> int:
    """Keras' ``verbose`` for ``trainer.verbose``: ``auto`` is a progress bar redrawn in place (1) on a
    terminal and one line per epoch (2) otherwise. Keras' own "auto" means 1 everywhere, and off a terminal
    its bar is appended step by step: a run logged to a file, SLURM or CI grew by a bar per step (MBs)."""
    if setting is None or str(setting) == "auto":
        stream = sys.stdout if stream is None else stream
        return 1 if getattr(stream, "isatty", lambda: False)() else 2
    return int(setting)


def fit_phase(
    setup: Setup,
    phase: Phase,
    callbacks: RunCallbacks,
    *,
    first_epoch: int,
    verbose: Any,
    resumed: checkpoints.Checkpoint | None = None,
) -> int:
    """Train one phase that starts at global epoch ``first_epoch`` (steps continue across phases), or
    continue it after ``resumed``'s epoch; returns the global epoch after its last. Early stopping leaves
    the phase's best weights in the model."""
    start = resumed.epoch + 1 if resumed else first_epoch
    end = start if resumed and resumed.state["stopped"] else first_epoch + phase.epochs
    history = setup.trainable_model.fit(
        setup.train_ds,
        validation_data=setup.val_ds,
        initial_epoch=start,
        epochs=end,
        shuffle=False,  # the tf.data pipeline shuffles, seeded
        class_weight=setup.class_weight,
        callbacks=callbacks.for_phase(phase, resumed),
        verbose=keras_verbose(verbose),
    )
    return start + len(history.epoch)


def wants_phase2(cfg: DictConfig) -> bool:
    return cfg.finetune.epochs > 0 and (
        cfg.finetune.unfreeze_blocks != 0 or bool(cfg.finetune.get("unfreeze_layers"))
    )


def best_value(history: list[dict[str, float]], objective: str) -> float:
    """The best epoch's ``objective`` (lowest for a loss, highest otherwise), NaN epochs ignored."""
    values = [h[objective] for h in history if objective in h and math.isfinite(h[objective])]
    if not values:
        raise RuntimeError(
            f"objective {objective!r} was never logged (or only NaN); "
            f"logged: {sorted(history[0]) if history else 'nothing'}"
        )
    return min(values) if "loss" in objective else max(values)


def train_head(cfg: DictConfig, setup: Setup, callbacks: RunCallbacks, resume: Resume | None = None) -> int:
    """Phase 1: the head (with the backbone frozen when it is pretrained) at ``trainer.lr``; returns the
    global epoch after its last."""
    phase = Phase.first(cfg)
    compile_for(setup, phase, cfg.trainer)
    if resume is not None:
        callbacks.resume_from(resume.run_id, resume.checkpoint)
    state = "trainable" if setup.backbone.trainable else "frozen"
    log.info("phase 1: %d epochs, backbone %s, lr %g", phase.epochs, state, phase.lr)
    resumed = resume.checkpoint if resume else None
    return fit_phase(setup, phase, callbacks, first_epoch=0, verbose=cfg.trainer.verbose, resumed=resumed)


def fine_tune(
    cfg: DictConfig, setup: Setup, callbacks: RunCallbacks, phase1_epochs: int, resume: Resume | None = None
) -> None:
    """Phase 2: unfreeze the top of the backbone and train at the low learning rate. If fine-tuning never
    beats phase 1, the model keeps phase 1's best weights, as "restore the best weights" promises."""
    from bloodcell import finetune

    phase = Phase.second(cfg)
    if setup.phase2_augmentation is not None:  # finetune.augmentation_strength
        setup.phase2_augmentation()
    if resume is None:
        callbacks.phase1_epochs = phase1_epochs
        callbacks.phase1_best = best_value(callbacks.epoch_log.history, "val_accuracy")
        callbacks.phase1_weights = setup.model.get_weights()
    with setup.strategy.scope():
        trainable_layers = finetune.unfreeze(setup.backbone, cfg)
    compile_for(setup, phase, cfg.trainer)
    if resume is not None:
        callbacks.resume_from(resume.run_id, resume.checkpoint)
    log.info(
        "phase 2: %d epochs, %d backbone layers trainable, lr %g", phase.epochs, trainable_layers, phase.lr
    )
    tracking.log_metrics({"finetune_trainable_layers": trainable_layers})
    resumed = resume.checkpoint if resume else None
    fit_phase(
        setup, phase, callbacks, first_epoch=phase1_epochs, verbose=cfg.trainer.verbose, resumed=resumed
    )
    phase2_best = best_value(callbacks.epoch_log.history[phase1_epochs:], "val_accuracy")
    phase2 = "phase2"
    averaged = average_weights(setup, callbacks, phase2_best) if callbacks.averaging else None
    if averaged is not None:
        phase2, phase2_best = "swa", averaged
    assert callbacks.phase1_best is not None and callbacks.phase1_weights is not None
    if phase2_best < callbacks.phase1_best:
        setup.model.set_weights(callbacks.phase1_weights)
    tracking.set_tags({"final_weights": phase2 if phase2_best >= callbacks.phase1_best else "phase1"})


def average_weights(setup: Setup, callbacks: RunCallbacks, best: float) -> float | None:
    """Stochastic weight averaging after phase 2 (``finetune.swa``): the mean of the trainable weights at
    the end of its last ``finetune.swa_epochs`` epochs, with the head's BatchNorm statistics recomputed for
    it (precise BN), scored on validation (metric ``swa_val_accuracy``). It stays in the model and its
    accuracy is returned when it scores at least ``best`` (the best epoch's, whose weights early stopping
    left in the model); otherwise those weights come back and the result is None."""
    averaging, model = callbacks.averaging, setup.trainable_model
    if averaging is None or not averaging.window:
        return None
    best_weights = model.get_weights()
    for variable, value in zip(model.trainable_weights, averaging.average()):
        variable.assign(value)
    if callbacks.precise_bn is not None:
        callbacks.precise_bn.recompute()
    accuracy = float(model.evaluate(setup.val_ds, verbose=0, return_dict=True)["accuracy"])
    tracking.log_metrics({"swa_val_accuracy": accuracy, "swa_epochs_averaged": len(averaging.window)})
    log.info(
        "weight average of %d epochs: val_accuracy %.4f (best epoch %.4f)",
        len(averaging.window),
        accuracy,
        best,
    )
    if accuracy >= best:
        return accuracy
    model.set_weights(best_weights)
    return None


def fit_both_phases(
    cfg: DictConfig,
    setup: Setup,
    callbacks: RunCallbacks,
    resume: Resume | None,
    cache: phase1_cache.Phase1Cache | None = None,
) -> int | None:
    """Phase 1, then phase 2 when the config wants it and time is left; a resumed run goes on in the phase
    its checkpoint was written in. Returns the global epoch phase 2 started at (None without phase 2)."""
    if resume is not None and resume.checkpoint.state["phase"] == "phase2":
        phase1_epochs = int(resume.checkpoint.state["phase1_epochs"])
        fine_tune(cfg, setup, callbacks, phase1_epochs, resume)
        return phase1_epochs
    if cache is None:
        phase1_epochs = train_head(cfg, setup, callbacks, resume)
    else:  # trained once per key, loaded by every later run with that key (trainer.reuse_phase1)
        phase1_epochs = phase1_cache.train_or_reuse(
            cache,
            setup,
            callbacks,
            prepare=lambda: compile_for(setup, Phase.first(cfg), cfg.trainer),
            train_phase1=lambda: train_head(cfg, setup, callbacks),
        )
    if wants_phase2(cfg) and not callbacks.out_of_time():
        fine_tune(cfg, setup, callbacks, phase1_epochs)
        return phase1_epochs
    return None


# ---- step 5: evaluate and record ------------------------------------------------------------------


@dataclass
class SplitPredictions:
    """The final model's predictions on one split, and what they score."""

    arrays: Arrays
    data_index: np.ndarray  # positions in the data set the split was cut from (`Splits.positions`)
    probabilities: np.ndarray
    evaluation: Evaluation


@dataclass
class TestResult:
    evaluation: Evaluation
    probabilities: np.ndarray
    tta: Evaluation | None = None
    #: the validation split, predicted once more by the final model (its weights are the best epoch's)
    val: SplitPredictions | None = None
    #: `Splits.fingerprint` of the splits both were cut from, and the test images' `Splits.positions`
    split_fingerprint: str = ""
    test_index: np.ndarray | None = None
    #: the model the run logs, whose outputs `probabilities` and `val.probabilities` are: the final model,
    #: followed by its temperature (bloodcell.calibration) when ``trainer.calibrate``
    model: keras.Model | None = None
    #: the temperature fitted on the validation split, and the final model's probabilities before it
    temperature: float | None = None
    uncalibrated: dict[str, np.ndarray] = field(default_factory=dict)


def final_result(
    model: keras.Model,
    splits: Splits,
    val_probabilities: np.ndarray,
    probabilities: np.ndarray,
    calibrate: bool,
) -> TestResult:
    """A final model's validation and test predictions, scored. With ``calibrate`` a temperature fitted on
    validation is applied to both and the model ends with it: every probability the run reports is the
    logged model's (a training run's, and an ensemble's, `bloodcell.ensemble`)."""
    import numpy as np

    from bloodcell.evaluate import evaluate_predictions

    temperature, uncalibrated = None, {}
    if calibrate:
        from bloodcell.calibration import apply_temperature, fit_temperature, with_temperature

        temperature = fit_temperature(val_probabilities, splits.val.labels)
        model = with_temperature(model, temperature)
        uncalibrated = {"val": val_probabilities, "test": probabilities}
        val_probabilities = apply_temperature(val_probabilities, temperature).astype(np.float32)
        probabilities = apply_temperature(probabilities, temperature).astype(np.float32)
        log.info("temperature scaling: T = %.3f (fitted on the validation split)", temperature)
    val = SplitPredictions(
        splits.val,
        splits.positions("val"),
        val_probabilities,
        evaluate_predictions(splits.val.labels, val_probabilities, "final_val_"),
    )
    return TestResult(
        evaluate_predictions(splits.test.labels, probabilities),
        probabilities,
        val=val,
        split_fingerprint=splits.fingerprint(),
        test_index=splits.positions("test"),
        model=model,
        temperature=temperature,
        uncalibrated=uncalibrated,
    )


def evaluate_splits(cfg: DictConfig, setup: Setup, splits: Splits) -> TestResult:
    """The final model on the validation split (one more predict, kept so that runs can be compared image by
    image later) and on the held-out test split, touched once: plain predictions, and test-time
    augmentation when asked."""
    from bloodcell.data import make_tf_dataset
    from bloodcell.evaluate import evaluate_predictions

    test = splits.test
    val_probabilities = setup.model.predict(setup.val_ds.map(lambda x, y: x), verbose=0)
    test_ds = make_tf_dataset(test, setup.batch_size, training=False, seed=cfg.seed)
    probabilities = setup.model.predict(test_ds.map(lambda x, y: x), verbose=0)
    calibrate = bool(cfg.trainer.get("calibrate", True))
    result = final_result(setup.model, splits, val_probabilities, probabilities, calibrate)
    model = result.model
    if cfg.trainer.get("test_tta"):
        from bloodcell.predict import predict_arrays

        # with the logged model: the mean over views of calibrated probabilities, as predict tta=true gives
        tta = predict_arrays(model, test.images, setup.batch_size, tta=True)
        result.tta = evaluate_predictions(test.labels, tta, "test_tta_")
        log.info("test accuracy with test-time augmentation %.4f", result.tta.metrics["test_tta_accuracy"])
    return result


def record(
    cfg: DictConfig,
    run_id: str,
    model_dir: Path,
    setup: Setup,
    test: Arrays,
    result: TestResult,
    history: list[dict[str, float]],
    phase2_start: int | None,
    timed: Stopwatch,
) -> float:
    """Everything the run keeps of its outcome: the objective, test metrics and plots, the model, where the
    time went. Returns the objective."""
    import numpy as np

    objective = best_value(history, cfg.objective)
    with timed("evaluate"):
        tracking.log_metrics({f"best_{cfg.objective}": objective})
        tracking.log_evaluation(result.evaluation, history, phase2_start)
        if result.tta is not None:
            tracking.log_metrics(result.tta.metrics)
        tracking.log_predictions(
            "test", test, result.test_index, result.probabilities, result.split_fingerprint
        )
        if cfg.tracking.get("explain", True):  # Grad-CAM: one gradient pass over up to 16 test images
            tracking.log_explanations(setup.model, test.images, test.labels, result.probabilities)
        if result.val is not None:
            val = result.val
            tracking.log_validation(val.evaluation)
            tracking.log_predictions(
                "val", val.arrays, val.data_index, val.probabilities, result.split_fingerprint
            )
        record_calibration(test, result)
    if cfg.tracking.log_model:
        with timed("log_model"):
            # the test predictions give the output example: another predict call would trace anew
            tracking.log_model(
                result.model or setup.model,
                test.images[:2].astype(np.float32),
                result.probabilities[:2],
                model_dir,
            )
    seconds = timed.metrics()
    tracking.log_timings(seconds)
    metrics = result.evaluation.metrics
    low, high = interval_names("test_accuracy")
    log.info(
        "test accuracy %.4f (95%% interval %.4f-%.4f), macro-F1 %.4f; best %s %.4f; run %s "
        "(%.0f s, %.0f s in fit)",
        metrics["test_accuracy"],
        metrics[low],
        metrics[high],
        metrics["test_macro_f1"],
        cfg.objective,
        objective,
        run_id,
        seconds["seconds_in_train"],
        seconds.get("seconds_fit", 0.0),
    )
    return objective


def record_calibration(test: Arrays, result: TestResult) -> None:
    """Temperature scaling's outcome (when the run calibrated): the temperature, the expected calibration
    error of both splits before and after, the test split's reliability diagram; and, always, the test
    split's accuracy/coverage curve on the probabilities the run reports."""
    from bloodcell import abstention, calibration

    if result.temperature is not None and result.val is not None:
        labels = {"val": result.val.arrays.labels, "test": test.labels}
        after = {"val": result.val.probabilities, "test": result.probabilities}
        tracking.log_calibration(
            calibration.calibration_metrics(result.temperature, labels, result.uncalibrated, after),
            calibration.reliability_figure(
                result.uncalibrated["test"], result.probabilities, test.labels, result.temperature
            ),
        )
    tracking.log_abstention(
        abstention.abstention_metrics(result.probabilities, test.labels),
        abstention.accuracy_coverage_figure(result.probabilities, test.labels),
    )


class Stopwatch:
    """Wall seconds per part of a run, logged as ``time/seconds_<part>`` metrics: where the time outside
    Keras' fit goes (benchmarks/overhead.py reads them)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - tic

    def metrics(self) -> dict[str, float]:
        """``seconds_<part>`` per part, and ``seconds_in_train``: everything since the stopwatch started."""
        total = {"in_train": time.perf_counter() - self.started}
        return {f"seconds_{part}": value for part, value in (self.seconds | total).items()}


def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


# ---- the recipe ---------------------------------------------------------------------------------------


def train(cfg: DictConfig, targets: Callable[[Splits], Targets] | None = None) -> float:
    """Run both phases, evaluate, record everything in MLflow; return the best ``cfg.objective``.
    ``targets`` (bloodcell.distill) gives the training split other targets than its one-hot labels, once
    the splits are cut and before the run starts."""
    check_config(cfg)
    tracking.check_reachable(tracking.resolve_tracking_uri(cfg.tracking))
    timed = Stopwatch()
    with timed("data"):
        data = load_splits(cfg)
    if targets is not None:
        with timed("targets"):
            data.use_targets(targets(data.splits))
    strategy = distribution_strategy(cfg.trainer)
    experiment_id, resume, run_dirs = start_or_resume(cfg, data)
    tags = data.tags() | {"config_digest": config_digest(cfg)}
    resume_id = resume.run_id if resume else None
    with tracking.start_run(
        cfg, tags=tags, experiment_id=experiment_id, resume_run_id=resume_id, local_root=run_dirs.root
    ) as run:
        if resume is not None:
            tracking.set_tags({"resumed_after_epoch": str(resume.checkpoint.epoch)})
        else:
            tracking.log_config(cfg, _hydra_overrides())
            if data.targets is not None:
                tracking.log_metrics(data.targets.metrics)
            tracking.log_datasets(cfg.data, data.arrays, data.splits)
            if data.cleaning is not None:
                tracking.log_cleaning(data.cleaning, data.arrays)
            if data.arrays.skipped:  # unreadable images of a folder data set, left out with a warning
                tracking.log_skipped_images(data.arrays.skipped, data.arrays.source)
        setup = build(cfg, data.splits, strategy, resumed=resume is not None)
        with run_dirs.checkpointing(run.info.run_id) as run_dir:
            callbacks = RunCallbacks.for_run(cfg, setup, data.splits.train.images, run_dir)
            # a resumed run continues its own checkpoint; a new one may start phase 2 from a stored phase 1
            cache = None
            if resume is None:
                cache = phase1_cache.for_run(
                    cfg, data.tags(), run_dirs.root, strategy.num_replicas_in_sync, run.info.run_id
                )
            with timed("fit"):
                phase2_start = fit_both_phases(cfg, setup, callbacks, resume, cache)
        with timed("evaluate"):
            result = evaluate_splits(cfg, setup, data.splits)
        objective = record(
            cfg,
            run.info.run_id,
            run_dirs.root / run.info.run_id,
            setup,
            data.splits.test,
            result,
            callbacks.epoch_log.history,
            phase2_start,
            timed,
        )
    run_dirs.finished(run.info.run_id)
    return objective


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="train")
def main(cfg: DictConfig) -> float:
    from bloodcell.repeats import train_members  # one run, or a trial's repeats / folds in turn

    return run_or_exit(train_members, cfg)


if __name__ == "__main__":
    main()
