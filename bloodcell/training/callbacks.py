"""Every Keras callback a training run uses, one top-level class each, importable and testable alone.

Imported only once training starts (it imports Keras), so a config typo still fails before TensorFlow
loads. The order ``train.fit_phase`` passes them in matters: precise BN first (its statistics are what
validation sees), then the epoch logger (what every later callback and MLflow read), then the stoppers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from bloodcell.core.settings import TrainSchema
from bloodcell.data.buffers import aligned_take, host_tensor

if TYPE_CHECKING:
    import optuna

    from bloodcell.tracking import Recorder

log = logging.getLogger("bloodcell.train")


#: per-epoch training throughput; under time/ with the run's timings (a section of its own in MLflow's UI)
IMAGES_PER_SECOND = "time/train_images_per_second"


def epoch_record(
    epoch: int, logs: dict[str, Any] | None, model: keras.Model, images_per_second: float | None = None
) -> dict[str, float]:
    """One epoch as a run records it: Keras' logs with ``val_*`` as they are and the rest as ``train_*``,
    the learning rate, the global epoch, and the training images per second when measured."""
    record: dict[str, float] = {"epoch": epoch}
    for key, value in (logs or {}).items():
        record[key if key.startswith("val_") else f"train_{key}"] = float(value)
    record["learning_rate"] = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    if images_per_second is not None:
        record[IMAGES_PER_SECOND] = float(images_per_second)
    return record


class EpochLogger(keras.callbacks.Callback):
    """Records every epoch's metrics and learning rate in the run, on one step axis across both phases
    (Keras' epoch index, continued in phase 2 through ``initial_epoch``), and keeps them in ``history``
    for the objective, the curves plot and phase 2's rollback decision."""

    #: its batch hook only reads the clock: Keras may keep dispatching training steps asynchronously
    async_safe = True

    def __init__(
        self,
        recorder: Recorder | None = None,
        history: list[dict[str, float]] | None = None,
        images_per_epoch: int = 0,
    ) -> None:
        super().__init__()
        #: the run the epochs are recorded in (None: history only)
        self.recorder = recorder
        self.history: list[dict[str, float]] = list(history or [])
        self.images_per_epoch = int(images_per_epoch)
        self.started: float | None = None
        self.trained: float | None = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.started, self.trained = time.perf_counter(), None

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # the end of the last training step, before validation and precise BN (they are not training)
        self.trained = time.perf_counter()

    def images_per_second(self) -> float | None:
        """This epoch's training images per second (the input pipeline included), None if not measured."""
        if not self.images_per_epoch or self.started is None or self.trained is None:
            return None
        return self.images_per_epoch / max(self.trained - self.started, 1e-6)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.record(epoch_record(epoch, logs, self.model, self.images_per_second()))

    def record(self, entry: dict[str, float]) -> None:
        self.history.append(entry)
        if self.recorder is not None:
            self.recorder.log_epoch({k: v for k, v in entry.items() if k != "epoch"}, int(entry["epoch"]))


class EpochOrder(keras.callbacks.Callback):
    """Tells the training pipeline which epoch starts, so that it draws that epoch's data order
    (`bloodcell.data.make_tf_dataset`): the order then depends on the seed and the epoch, not on how many
    iterators Keras made, and a resumed run continues it."""

    def __init__(self, epoch: Any) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch.assign(epoch)


class TimeLimit(keras.callbacks.Callback):
    """Stops after the epoch that crosses a wall-clock budget (``trainer.time_limit_minutes``, counted from
    the start of phase 1 across both phases, and across a resume): compare recipes at equal cost."""

    def __init__(self, limit_seconds: float) -> None:
        super().__init__()
        self.limit_seconds = float(limit_seconds)
        self.deadline = time.monotonic() + self.limit_seconds

    def spent(self) -> float:
        return self.limit_seconds - (self.deadline - time.monotonic())

    def already_spent(self, seconds: float) -> None:
        """A resumed run: the time its earlier process trained counts against the budget."""
        self.deadline = time.monotonic() + self.limit_seconds - seconds

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.expired():
            log.info("time limit reached after epoch %d", epoch + 1)
            self.model.stop_training = True


class PreciseBatchNorm(keras.callbacks.Callback):
    """Before every validation, recomputes the statistics of the head's BatchNorm layers from clean
    (un-augmented) training images ("precise BN", Wu & Johnson, *Rethinking 'Batch' in BatchNorm*, 2021).

    During training those layers normalise augmented batches, and their moving averages lag weights that
    change every step; at inference they meet clean images. On real cells (mobilenet_cpu) that mismatch
    cost 0.7 accuracy points and made validation accuracy swing by several points between epochs. The
    backbone's BatchNorm is left alone (frozen ImageNet statistics, or trained with the backbone).
    Build it with `for_model`, which returns None when there is nothing to recompute.
    """

    def __init__(
        self,
        norms: list[keras.layers.BatchNormalization],
        parts: list[keras.Model],
        images: Any,
        batch_size: int,
    ) -> None:
        super().__init__()
        self.norms, self.parts, self.images, self.batch_size = norms, parts, images, batch_size

    @classmethod
    def for_model(
        cls, model: keras.Model, train_images: np.ndarray, count: int, seed: int, batch_size: int
    ) -> PreciseBatchNorm | None:
        """The callback for ``model``, on a fixed seeded sample of ``count`` training images; None when the
        model has no BatchNorm outside the backbone or ``count`` is 0."""
        import tensorflow as tf

        norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        sample = np.sort(np.random.default_rng(seed).permutation(len(train_images))[: max(int(count), 0)])
        if not norms or len(sample) == 0:
            return None
        # one pass through the backbone up to the first BatchNorm, then only the small head parts between
        parts = [keras.Model(model.inputs, norms[0].input)] + [
            keras.Model(before.input, after.input) for before, after in zip(norms, norms[1:])
        ]
        images = (
            tf.data.Dataset.from_tensor_slices(host_tensor(aligned_take(train_images, sample)))
            .batch(batch_size)
            .map(lambda x: tf.cast(x, tf.float32))
        )
        return cls(norms, parts, images, batch_size)

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.recompute()

    def recompute(self) -> None:
        """Set the head's BatchNorm statistics for the weights the model holds now (also after averaging
        them: `WeightAverage`)."""
        x = self.parts[0].predict(self.images, verbose=0)
        for i, norm in enumerate(self.norms):
            if i:
                x = self.parts[i].predict(x, batch_size=self.batch_size, verbose=0)
            x64 = x.astype(np.float64)
            norm.moving_mean.assign(x64.mean(axis=0).astype(np.float32))
            norm.moving_variance.assign(x64.var(axis=0).astype(np.float32))


class Validation(keras.callbacks.Callback):
    """Scores every epoch on the validation split with a predict pass of the saved model, in place of the
    validation Keras' ``fit`` would run (``validation_data``), and keeps each epoch's probabilities.

    Why: the final model is always one epoch's weights (early stopping's best epoch of the phase that is
    kept), so the validation predictions it needs (calibration, the review thresholds, ``compare``,
    ``ensemble``) are in hand and the run makes no second pass over the split (issue 29: about 3 s of a
    3-epoch mobilenet_cpu run). `RunCallbacks.final_val_probabilities` finds the epoch.

    It puts ``val_loss`` (the compiled loss, with its label smoothing, and the model's own losses) and
    ``val_accuracy`` in the epoch's logs, computed as Keras' validation computes them, before any other
    callback reads them: it must come first in the list. ``around`` are the callbacks Keras' validation
    would have called around the pass (``on_test_begin``/``on_test_end``: the EMA swap, precise BN), in
    the order Keras calls them."""

    def __init__(
        self,
        predict_model: keras.Model,
        images: Any,
        targets: np.ndarray,
        around: list[keras.callbacks.Callback] | None = None,
    ) -> None:
        super().__init__()
        self.predict_model, self.images, self.targets = predict_model, images, targets
        self.around = list(around or [])
        #: global epoch -> that epoch's validation probabilities (kilobytes each)
        self.probabilities: dict[int, np.ndarray] = {}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for callback in self.around:
            callback.on_test_begin()
        probabilities = self.predict_model.predict(self.images, verbose=0)
        for callback in self.around:
            callback.on_test_end()
        self.probabilities[epoch] = probabilities
        if logs is not None:
            logs.update(self.scores(probabilities))

    def scores(self, probabilities: np.ndarray) -> dict[str, float]:
        loss = keras.ops.convert_to_numpy(self.model.loss(self.targets, probabilities))
        extra = sum(float(keras.ops.convert_to_numpy(term)) for term in self.model.losses)
        hits = probabilities.argmax(axis=1) == self.targets.argmax(axis=1)
        return {"val_loss": float(loss) + extra, "val_accuracy": float(hits.mean())}


class OptunaPruning(keras.callbacks.Callback):
    """Reports the objective to the run's Optuna trial after every epoch (step = the global epoch, counted
    on across both phases) and raises ``optuna.TrialPruned`` when the study's pruner stops the trial.
    Built by `pruning_callback`, which reopens the trial from the sweep's storage."""

    def __init__(
        self,
        trial: optuna.Trial,
        objective: str,
        reported_steps: Iterable[int] = (),
        number: int | None = None,
    ) -> None:
        super().__init__()
        self.trial, self.objective, self.number = trial, objective, number
        self.reported = set(reported_steps)
        # a second instance (say, one per phase) goes on after the steps already reported
        self.next_step = max(self.reported, default=-1) + 1
        self.warned = False

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:

        value = (logs or {}).get(self.objective)
        if value is None:
            if not self.warned:
                log.warning(
                    "objective %r is not an epoch metric (%s): trial %s cannot be pruned",
                    self.objective,
                    ", ".join(sorted(logs or {})),
                    self.number,
                )
                self.warned = True
            return
        step = max(int(epoch), self.next_step)
        self.next_step = step + 1
        self.report(float(value), step)

    def resume_after(self, epoch: int, record: dict[str, float]) -> None:
        """A resumed run goes on after ``epoch``; that epoch is reported if the killed process had not."""
        value = record.get(self.objective, record.get(f"train_{self.objective}"))
        if value is not None and epoch not in self.reported:
            from bloodcell.sweep.trial import with_storage_retries

            with_storage_retries(lambda: self.trial.report(float(value), epoch))
            self.reported.add(epoch)
        self.next_step = epoch + 1

    def replay(self, record: dict[str, float]) -> None:
        """An epoch that another run trained (`phase1_cache`), reported at its step as if trained
        here: the pruner decides on the same values at the same steps."""
        value = record.get(self.objective, record.get(f"train_{self.objective}"))
        if value is None:
            return
        step = max(int(record["epoch"]), self.next_step)
        self.next_step = step + 1
        self.report(float(value), step)

    def report(self, value: float, step: int) -> None:
        import optuna

        from bloodcell.sweep.trial import with_storage_retries

        with_storage_retries(lambda: self.trial.report(value, step))
        self.reported.add(step)
        if with_storage_retries(self.trial.should_prune):
            if getattr(self, "model", None) is not None:
                self.model.stop_training = True
            shown = f"{value:.4f}" if math.isfinite(value) else str(value)
            raise optuna.TrialPruned(f"pruned after epoch {step} ({self.objective}={shown})")


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' EarlyStopping (monitor, patience, best weights restored at the end), whose counters can be
    saved in a checkpoint and set again when a run resumes: Keras resets them in ``on_train_begin``.

    With ``ema`` (the optimizer averages the weights, ``trainer.ema``) the best epoch's weights it keeps
    and restores are the averaged ones, the weights its validation scored (`keras.callbacks.SwapEMAWeights`
    swaps them in for validation only): Keras' own EarlyStopping would keep the raw weights, and restoring
    them at the end would undo the average that ``fit`` has just put in."""

    best_weights: list[np.ndarray] | None

    def __init__(
        self,
        *,
        resume_from: dict[str, Any] | None = None,
        best_weights: list[np.ndarray] | None = None,
        ema: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.resume_from, self.resume_weights, self.ema = resume_from, best_weights, ema

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        if self.ema and self.restore_best_weights and self.best_epoch == epoch and self.best_weights:
            self.best_weights = ema_weights(self.model)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        if self.resume_from is not None:
            self.wait = int(self.resume_from["wait"])
            self.best = self.resume_from["best"]
            self.best_epoch = int(self.resume_from["best_epoch"])
            self.best_weights = self.resume_weights

    def state(self) -> dict[str, Any]:
        best = None if self.best is None else float(self.best)
        return {"wait": int(self.wait), "best": best, "best_epoch": int(self.best_epoch)}


def ema_weights(model: keras.Model) -> list[np.ndarray]:
    """``model.get_weights()`` with each trainable weight replaced by its exponential moving average, as
    the model's optimizer (``use_ema``) keeps it. Keras has no public accessor: this reads the same
    optimizer attributes as `keras.callbacks.SwapEMAWeights`."""
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # a LossScaleOptimizer's
    averages = {
        id(variable): average
        for variable, average in zip(
            optimizer._trainable_variables, optimizer._model_variables_moving_average
        )
    }
    return [keras.ops.convert_to_numpy(averages.get(id(v), v)) for v in model.weights]


class WeightAverage(keras.callbacks.Callback):
    """Stochastic weight averaging (``finetune.swa``, Izmailov et al. 2018): keeps the trainable weights
    at the end of each of the last ``epochs`` epochs; `average` is their mean. Its BatchNorm statistics are
    recomputed afterwards (`PreciseBatchNorm.recompute`): the averaged weights never ran on a batch.
    ``window`` is what a checkpoint keeps (`flat` / `restore`), so a resumed run averages the same epochs."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = int(epochs)
        self.window: list[list[np.ndarray]] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.window = [*self.window, [v.numpy() for v in self.model.trainable_weights]][-self.epochs :]

    def average(self) -> list[np.ndarray]:
        return [np.mean(np.stack(snapshots), axis=0) for snapshots in zip(*self.window)]

    def flat(self) -> list[np.ndarray]:
        return [array for snapshot in self.window for array in snapshot]

    def restore(self, arrays: list[np.ndarray], per_snapshot: int) -> None:
        """The window a checkpoint kept (`flat`), ``per_snapshot`` arrays per epoch."""
        self.window = [list(arrays[i : i + per_snapshot]) for i in range(0, len(arrays), per_snapshot)]


class Checkpoint(keras.callbacks.Callback):
    """Writes a checkpoint (`checkpoints`) every ``every`` epochs, keeping the newest ``keep``.

    It runs after early stopping and the time limit (so their decisions of this epoch are in it) and
    before the epoch is recorded in MLflow or reported to Optuna: a run killed between the two redoes
    nothing on resume and records the saved epoch from the checkpoint, so no metric step is missing or
    logged twice. ``snapshot(epoch, logs)`` returns what to save (`bloodcell.train` knows the parts).
    """

    def __init__(self, run_dir: Any, snapshot: Any, every: int = 1, keep: int = 1) -> None:
        super().__init__()
        self.run_dir, self.snapshot, self.every, self.keep = run_dir, snapshot, every, keep
        self.warned = False

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        from bloodcell.training import checkpoints

        if self.every > 0 and ((epoch + 1) % self.every == 0 or self.model.stop_training):
            try:
                checkpoints.save(self.run_dir, self.snapshot(epoch, logs), self.keep)
            except OSError as err:  # a full disk must not end a run that could still finish
                if not self.warned:
                    log.warning(
                        "checkpoint of epoch %d not written (%s); training goes on, the previous "
                        "checkpoint stays",
                        epoch,
                        err,
                    )
                    self.warned = True


def pruning_callback(settings: TrainSchema | Any) -> OptunaPruning | None:
    """A Keras callback reporting ``objective`` to this run's Optuna trial (``trial``) after every epoch
    (step = the global epoch, counted on across both training phases) and raising ``optuna.TrialPruned``
    when the study's pruner stops the trial. None outside a sweep (no ``trial``). ``settings``: the run's
    (or a mapping of them: `TrainSchema.of`)."""
    settings = TrainSchema.of(settings)
    if not settings.trial:
        return None
    from bloodcell.sweep.trial import open_trial

    trial, frozen = open_trial(settings.trial)
    return OptunaPruning(
        trial,
        objective=settings.objective,
        reported_steps=frozen.intermediate_values,
        number=frozen.number,
    )
