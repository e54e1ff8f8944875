"""The two phases of a run as calls of Keras' fit: phase 1 trains the head on a frozen backbone, phase 2
fine-tunes the top of the backbone at a lower rate (`Phase`), with the callbacks both share
(`RunCallbacks`: validation, precise BN, early stopping, checkpoint, time limit, pruning, weight
averaging), and phase 2's rollback to phase 1 when it did not improve.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloodcell import tracking
from bloodcell.core.errors import UserError
from bloodcell.core.settings import FinetuneSchema, TrackingSchema, TrainerSchema, TrainSchema
from bloodcell.tracking.recorder import Recorder
from bloodcell.training import checkpoints
from bloodcell.training.resume import Resume
from bloodcell.training.setup import Setup

if TYPE_CHECKING:
    import keras
    import numpy as np

    from bloodcell.data import Splits
    from bloodcell.training.callbacks import (
        Checkpoint,
        EpochLogger,
        EpochOrder,
        OptunaPruning,
        PreciseBatchNorm,
        ResumableEarlyStopping,
        TimeLimit,
        Validation,
        WeightAverage,
    )
log = logging.getLogger("bloodcell.train")


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
    def first(cls, trainer: TrainerSchema) -> Phase:
        """Phase 1: the head (and a randomly initialised backbone) at ``trainer.lr``."""
        t = trainer
        return cls(
            "phase1", t.epochs, t.lr, t.lr_decay_steps, t.lr_decay_rate, t.early_stopping_patience, ema(t)
        )

    @classmethod
    def second(cls, finetune: FinetuneSchema, trainer: TrainerSchema) -> Phase:
        """Phase 2: fine-tuning the top of the backbone at ``finetune.lr`` (``trainer.ema`` both phases)."""
        f = finetune
        return cls(
            "phase2",
            f.epochs,
            f.lr,
            f.lr_decay_steps,
            f.lr_decay_rate,
            f.early_stopping_patience,
            ema(trainer),
        )


def ema(trainer: TrainerSchema) -> float | None:
    """``trainer.ema_momentum`` when ``trainer.ema`` is on, else None."""
    return float(trainer.ema_momentum) if trainer.ema else None


@dataclass
class RunCallbacks:
    """The callbacks both phases share: validation, precise BN, the epoch logger (whose history the run
    reads), the time limit, the checkpoint and the Optuna pruner; early stopping is made per phase (its
    patience differs). Also what a checkpoint saves of the run's progress (`snapshot`), and which epoch's
    validation predictions are the final model's (`final_val_probabilities`)."""

    setup: Setup
    #: the run's MLflow records
    recorder: Recorder
    validation: Validation
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
    #: the run's ``tracking`` settings: how long a resumed trial's look-ups wait for its server
    tracking_settings: TrackingSchema | None = None
    #: the epoch whose weights the model holds after the last phase (`final_val_probabilities`)
    final_epoch: int | None = None
    #: phase 1's, kept while phase 2 runs: the model's epoch again if phase 2 rolls back
    phase1_final_epoch: int | None = None

    @classmethod
    def for_run(
        cls,
        settings: TrainSchema,
        setup: Setup,
        splits: Splits,
        run_dir: Path | None,
        recorder: Recorder,
    ) -> RunCallbacks:
        """The callbacks ``settings`` ask for: precise BN (``head.precise_bn_images``), the time limit,
        checkpoints (``trainer.*``), weight averaging (``finetune.swa``), the Optuna pruner (``trial``)."""
        from bloodcell.training.callbacks import (
            Checkpoint,
            EpochLogger,
            EpochOrder,
            PreciseBatchNorm,
            TimeLimit,
            Validation,
            WeightAverage,
            pruning_callback,
        )

        trainer = settings.trainer
        train_images = splits.train.images
        precise_bn = PreciseBatchNorm.for_model(
            setup.model, train_images, settings.head.precise_bn_images or 0, settings.seed, setup.batch_size
        )
        validation = Validation(
            setup.model, setup.val_ds.map(lambda x, y: x), splits.val.target_distributions()
        )
        minutes = trainer.time_limit_minutes
        time_limit = TimeLimit(60 * minutes) if minutes else None
        every = trainer.checkpoint.every if run_dir is not None else 0
        epoch_log = EpochLogger(recorder, images_per_epoch=len(train_images))
        pruner = pruning_callback(settings)
        callbacks = cls(setup, recorder, validation, epoch_log, precise_bn, time_limit, None, pruner)
        callbacks.tracking_settings = settings.tracking
        callbacks.order = EpochOrder(setup.epoch) if setup.epoch is not None else None
        if settings.finetune.swa:
            callbacks.averaging = WeightAverage(settings.finetune.swa_epochs)
        if every > 0:
            callbacks.checkpoint = Checkpoint(run_dir, callbacks.snapshot, every, trainer.checkpoint.keep)
        return callbacks

    def for_phase(
        self, phase: Phase, resumed: checkpoints.Checkpoint | None = None
    ) -> list[keras.callbacks.Callback]:
        import keras

        from bloodcell.training.callbacks import ResumableEarlyStopping

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
        # validation first, with the EMA swap and precise BN around its pass (its statistics are what it
        # scores), so that every later callback reads its val_* logs; the checkpoint after the stoppers
        # (their decisions are part of it) and before the epoch is recorded or reported (callbacks.Checkpoint)
        self.validation.around = [c for c in (swap, self.precise_bn) if c is not None]
        ordered = [
            self.validation,
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

    def phase_ended(self) -> None:
        """After a phase's fit: early stopping has put its best epoch's weights back (``best_weights``; with
        none kept, the model is in an unknown epoch's state)."""
        stopping = self.stopping
        if stopping is None or stopping.best_weights is None:
            self.final_epoch = None
        else:
            self.final_epoch = int(stopping.best_epoch)

    def final_val_probabilities(self) -> np.ndarray | None:
        """The validation probabilities of the weights the model holds now, when one of this process's
        epochs scored exactly them (`callbacks.Validation`); None when not in hand: the epochs of a resumed
        run's earlier process, a phase 1 reused from the cache, a weight average. The caller predicts then."""
        kept = None if self.final_epoch is None else self.validation.probabilities.get(self.final_epoch)
        if kept is None:
            log.debug("the final model's validation predictions are not in hand: one more predict pass")
        else:
            log.debug("the final model's validation predictions: epoch %d's own pass", self.final_epoch)
        return kept

    def out_of_time(self) -> bool:
        return self.time_limit is not None and self.time_limit.expired()

    def snapshot(self, epoch: int, logs: dict[str, Any] | None) -> checkpoints.Checkpoint:
        """This epoch's state, for `bloodcell.training.checkpoints`."""
        from bloodcell.training.callbacks import epoch_record

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
        if saved.epoch not in tracking.logged_steps(run_id, "val_accuracy", self.tracking_settings):
            self.epoch_log.record(
                last
            )  # killed after the checkpoint was written, before MLflow had the epoch
        else:
            self.epoch_log.history.append(last)
        if self.pruner is not None:
            self.pruner.resume_after(saved.epoch, last)


def compile_for(setup: Setup, phase: Phase, trainer: TrainerSchema) -> None:
    """A fresh optimizer for the phase (Adam on an exponentially decaying learning rate); ``trainer`` gives
    the label smoothing and whether Keras traces its steps (``trainer.run_eagerly``)."""
    import keras

    from bloodcell.models.finetune import optimizer

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
    # no validation_data: callbacks.Validation scores each epoch (and keeps its predictions)
    history = setup.trainable_model.fit(
        setup.train_ds,
        initial_epoch=start,
        epochs=end,
        shuffle=False,  # the tf.data pipeline shuffles, seeded
        class_weight=setup.class_weight,
        callbacks=callbacks.for_phase(phase, resumed),
        verbose=keras_verbose(verbose),
    )
    callbacks.phase_ended()
    return start + len(history.epoch)


def wants_phase2(finetune: FinetuneSchema) -> bool:
    """Phase 2 runs when it has epochs and something to unfreeze."""
    return finetune.epochs > 0 and (finetune.unfreeze_blocks != 0 or bool(finetune.unfreeze_layers))


def best_value(history: list[dict[str, float]], objective: str) -> float:
    """The best epoch's ``objective`` (lowest for a loss, highest otherwise), NaN epochs ignored."""
    values = [h[objective] for h in history if objective in h and math.isfinite(h[objective])]
    if not values:
        raise RuntimeError(
            f"objective {objective!r} was never logged (or only NaN); "
            f"logged: {sorted(history[0]) if history else 'nothing'}"
        )
    return min(values) if "loss" in objective else max(values)


def train_head(
    trainer: TrainerSchema, setup: Setup, callbacks: RunCallbacks, resume: Resume | None = None
) -> int:
    """Phase 1: the head (with the backbone frozen when it is pretrained) at ``trainer.lr``; returns the
    global epoch after its last."""
    phase = Phase.first(trainer)
    compile_for(setup, phase, trainer)
    if resume is not None:
        callbacks.resume_from(resume.run_id, resume.checkpoint)
    state = "trainable" if setup.backbone.trainable else "frozen"
    log.info("phase 1: %d epochs, backbone %s, lr %g", phase.epochs, state, phase.lr)
    resumed = resume.checkpoint if resume else None
    return fit_phase(setup, phase, callbacks, first_epoch=0, verbose=trainer.verbose, resumed=resumed)


def fine_tune(
    settings: TrainSchema,
    setup: Setup,
    callbacks: RunCallbacks,
    phase1_epochs: int,
    resume: Resume | None = None,
) -> None:
    """Phase 2: unfreeze the top of the backbone and train at the low learning rate. If fine-tuning never
    beats phase 1, the model keeps phase 1's best weights, as "restore the best weights" promises. Reads
    ``finetune``, ``trainer`` and ``backbone`` (which layers unfreeze, the BatchNorm policy)."""
    from bloodcell.models import finetune

    phase = Phase.second(settings.finetune, settings.trainer)
    if setup.phase2_augmentation is not None:  # finetune.augmentation_strength
        setup.phase2_augmentation()
    if resume is None:
        callbacks.phase1_epochs = phase1_epochs
        callbacks.phase1_best = best_value(callbacks.epoch_log.history, "val_accuracy")
        callbacks.phase1_weights = setup.model.get_weights()
        callbacks.phase1_final_epoch = callbacks.final_epoch
    with setup.strategy.scope():
        trainable_layers = finetune.unfreeze(setup.backbone, settings)
    compile_for(setup, phase, settings.trainer)
    if resume is not None:
        callbacks.resume_from(resume.run_id, resume.checkpoint)
    log.info(
        "phase 2: %d epochs, %d backbone layers trainable, lr %g", phase.epochs, trainable_layers, phase.lr
    )
    callbacks.recorder.log_metrics({"finetune_trainable_layers": trainable_layers})
    resumed = resume.checkpoint if resume else None
    fit_phase(
        setup, phase, callbacks, first_epoch=phase1_epochs, verbose=settings.trainer.verbose, resumed=resumed
    )
    phase2_best = best_value(callbacks.epoch_log.history[phase1_epochs:], "val_accuracy")
    phase2 = "phase2"
    averaged = average_weights(setup, callbacks, phase2_best) if callbacks.averaging else None
    if averaged is not None:
        phase2, phase2_best = "swa", averaged
        callbacks.final_epoch = None  # the average is no epoch's weights
    assert callbacks.phase1_best is not None and callbacks.phase1_weights is not None
    if phase2_best < callbacks.phase1_best:
        setup.model.set_weights(callbacks.phase1_weights)
        callbacks.final_epoch = callbacks.phase1_final_epoch
    callbacks.recorder.set_tags(
        {"final_weights": phase2 if phase2_best >= callbacks.phase1_best else "phase1"}
    )


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
    callbacks.recorder.log_metrics(
        {"swa_val_accuracy": accuracy, "swa_epochs_averaged": len(averaging.window)}
    )
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
