"""A run's own validation pass (`callbacks.Validation`, issue 29) in a real (tiny) Keras fit: it scores each
epoch as Keras' own validation did, with the EMA swap and precise BN around it, and the probabilities it
keeps for early stopping's best epoch are the restored model's. It trains, so it sits with the end-to-end
tests rather than in tests/unit."""

from __future__ import annotations

import numpy as np

from bloodcell.models import build_model
from tests.helpers import model_config as config


def test_own_validation_pass_scores_epochs_as_keras_validation_and_keeps_the_best_epochs_predictions():
    import keras
    import tensorflow as tf

    from bloodcell.training.callbacks import PreciseBatchNorm, ResumableEarlyStopping, Validation

    cfg = config("small_cnn", filters=[8, 8], bn=True)
    cfg.head.units, cfg.head.dropout = [16, 8], [0.2, 0.1]
    rng = np.random.default_rng(0)
    train = rng.integers(0, 255, (64, 32, 32, 3)).astype(np.float32)
    train_labels = keras.utils.to_categorical(rng.integers(0, 8, 64), 8)
    val = rng.integers(0, 255, (40, 32, 32, 3)).astype(np.float32)
    val_labels = keras.utils.to_categorical(rng.integers(0, 8, 40), 8)
    start = build_model(cfg, (32, 32, 3)).get_weights()

    def fit(own_validation: bool) -> tuple[keras.Model, dict, Validation | None, ResumableEarlyStopping]:
        keras.utils.set_random_seed(1)
        model = build_model(cfg, (32, 32, 3))
        model.set_weights(start)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2, use_ema=True, ema_momentum=0.5),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
            metrics=["accuracy"],
        )
        precise = PreciseBatchNorm.for_model(model, train.astype(np.uint8), 64, seed=0, batch_size=16)
        swap = keras.callbacks.SwapEMAWeights()
        stopping = ResumableEarlyStopping(
            monitor="val_accuracy", patience=10, restore_best_weights=True, ema=True
        )
        validation = None
        callbacks: list = [swap, precise, stopping]
        if own_validation:
            validation = Validation(model, tf.data.Dataset.from_tensor_slices(val).batch(16), val_labels)
            validation.around = [swap, precise]
            callbacks.insert(0, validation)
        history = model.fit(
            train,
            train_labels,
            validation_data=None if own_validation else (val, val_labels),
            batch_size=16,
            epochs=4,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
        return model, history.history, validation, stopping

    _, keras_history, _, keras_stopping = fit(own_validation=False)
    model, history, validation, stopping = fit(own_validation=True)
    assert validation is not None
    # the same scores epoch by epoch (the same weights, the same swap and statistics)
    np.testing.assert_allclose(history["val_accuracy"], keras_history["val_accuracy"], atol=1e-6)
    np.testing.assert_allclose(history["val_loss"], keras_history["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(history["loss"], keras_history["loss"], rtol=1e-5)
    assert stopping.best_epoch == keras_stopping.best_epoch
    assert sorted(validation.probabilities) == list(range(4))
    # after fit, the model holds the best epoch's (averaged) weights: its predictions are the kept ones
    kept = validation.probabilities[stopping.best_epoch]
    np.testing.assert_allclose(model.predict(val, verbose=0), kept, atol=1e-6)
    assert len({round(v, 6) for v in history["val_loss"]}) == 4  # the epochs' weights did differ
