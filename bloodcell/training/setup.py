"""What both phases train: devices and precision (`distribution_strategy`), the augmentation and input
pipelines and the model with its backbone frozen as phase 1 wants it (`build` -> `Setup`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bloodcell import NUM_CLASSES
from bloodcell.core.settings import AugmentationSchema, TrainerSchema, TrainSchema
from bloodcell.tracking.recorder import Recorder

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from bloodcell.data import Splits
log = logging.getLogger("bloodcell.train")


#: trainer.mixed_precision values and the Keras dtype policy each sets (true = mixed_float16, the usual one)
PRECISION_POLICIES = {
    False: None,
    True: "mixed_float16",
    "mixed_float16": "mixed_float16",
    "mixed_bfloat16": "mixed_bfloat16",
}


def precision_policy(trainer: TrainerSchema) -> str | None:
    """The Keras dtype policy ``trainer.mixed_precision`` asks for; None (or null) keeps float32. bfloat16
    needs no loss scaling and on Hopper/Ampere GPUs beat float16 (README)."""
    value = trainer.mixed_precision
    return None if value is None else PRECISION_POLICIES[value]


def distribution_strategy(trainer: TrainerSchema) -> tf.distribute.Strategy:
    """Sets the dtype policy (``trainer.mixed_precision``) and returns the strategy
    (``trainer.distribute``: one device, or MirroredStrategy over all visible GPUs)."""
    import keras
    import tensorflow as tf

    policy = precision_policy(trainer)
    if policy:
        keras.mixed_precision.set_global_policy(policy)
    return (
        tf.distribute.MirroredStrategy() if trainer.distribute == "mirrored" else tf.distribute.get_strategy()
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


def build(
    settings: TrainSchema,
    splits: Splits,
    strategy: tf.distribute.Strategy,
    preview_to: Recorder | None = None,
) -> Setup:
    """Augmentation and input pipelines, then the model with its backbone frozen as phase 1 wants it; a
    preview of the augmentation goes to ``preview_to`` (None for a resumed run: it has its preview).
    The training order of each epoch depends on the seed and the epoch only, so a resumed run continues it.
    Reads ``seed``, ``augmentation``, ``trainer`` (batch size, class weights), ``finetune`` (phase 2's
    strength, the BatchNorm policy), ``backbone`` and ``head``."""
    import keras
    import tensorflow as tf

    from bloodcell import augment
    from bloodcell.augment.pipeline import strength_of
    from bloodcell.data import class_weights, make_tf_dataset
    from bloodcell.models import BACKBONE_LAYER, batchnorm_frozen, build_model, finetune

    # seeded here, after the MLflow run started: MLflow draws its friendly run names from Python's `random`
    seed = settings.seed
    keras.utils.set_random_seed(seed)
    in_model = settings.augmentation.where == "model"
    batch = settings.trainer.batch_size * strategy.num_replicas_in_sync
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_epoch")

    def training_pipeline(aug: AugmentationSchema) -> tuple[Any, Any, tf.data.Dataset, list[keras.Layer]]:
        """The augmentation and mixer of ``aug``, the training pipeline (which applies the augmentation
        unless it runs in the model), and the Keras layers whose random state a checkpoint keeps."""
        with strategy.scope():  # in the model its seed variables must live on the training devices
            augmentation = augment.build_augmentation(aug, seed)
        mixer = augment.build_mixer(aug, NUM_CLASSES, seed)
        in_pipeline = None if in_model else augmentation
        train_ds = make_tf_dataset(
            splits.train, batch, training=True, seed=seed, augment=in_pipeline, mixer=mixer, epoch=epoch
        )
        random_layers = [layer for layer in (in_pipeline, mixer) if isinstance(layer, keras.Layer)]
        return augmentation, mixer, train_ds, random_layers

    augmentation, mixer, train_ds, random_layers = training_pipeline(settings.augmentation)
    val_ds = make_tf_dataset(splits.val, batch, training=False, seed=seed)
    if augmentation is not None and preview_to is not None:
        grid = augment.preview_grid(
            splits.train.images[:6],
            augmentation,
            views=5,
            seed=seed,
            mixer=mixer,
            labels=splits.train.labels[:6],
        )
        preview_to.log_image(grid, "plots/augmentation_preview.png")

    with strategy.scope():
        model = build_model(settings, splits.train.images.shape[1:])
        # With augmentation inside the model it runs on the accelerator; only `model` (without it) is saved,
        # so the logged model needs neither bloodcell nor KerasCV to load.
        trainable_model = keras.Sequential([augmentation, model]) if in_model and augmentation else model
        backbone = model.get_layer(BACKBONE_LAYER)
        finetune.set_backbone_trainable(
            backbone,
            not finetune.freeze_backbone_in_phase1(settings),
            keep_batchnorm_frozen=batchnorm_frozen(settings),
        )
    weights = class_weights(splits.train.labels) if settings.trainer.class_weight == "balanced" else None
    setup = Setup(
        model, trainable_model, backbone, train_ds, val_ds, batch, strategy, weights, random_layers, epoch
    )
    strength2 = settings.finetune.augmentation_strength
    if strength2 is not None and float(strength2) != strength_of(settings.augmentation):

        def phase2_augmentation() -> None:
            """The same pipeline at phase 2's strength (its own random state, seeded as phase 1's was).
            Phase 1 never sees it: a study can search it and still reuse phase 1 (phase1_cache)."""
            aug = settings.augmentation.model_copy(update={"strength": float(strength2)})
            augmentation, _, setup.train_ds, setup.random_layers = training_pipeline(aug)
            if in_model:
                with strategy.scope():
                    setup.trainable_model = keras.Sequential([augmentation, model]) if augmentation else model

        setup.phase2_augmentation = phase2_augmentation
    return setup
