"""The hand-written alternative: the `mobilenet_cpu` recipe as a user would write it in plain Keras
(no Hydra, no MLflow, no bloodcell), trained on the same split for the same wall-clock budget, so the
two can be compared side by side:

    python benchmarks/plain_keras.py --minutes 10
    python -m bloodcell.train +experiment=mobilenet_cpu trainer.time_limit_minutes=10

Prints held-out test accuracy, epochs trained and seconds inside fit. benchmarks/overhead.py runs it with
`--epochs 3 --finetune-epochs 0` beside bloodcell's 3-epoch run: a script's own cost outside fit.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO / "data" / "training_set.npz"))
    ap.add_argument("--minutes", type=float, default=45)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--size", type=int, default=160, help="input side inside the model (the preset's)")
    ap.add_argument("--epochs", type=int, default=3, help="phase 1 (frozen backbone) epochs")
    ap.add_argument("--finetune-epochs", type=int, default=60, help="phase 2 epochs at most; 0 skips it")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf
    from keras import layers
    from sklearn.model_selection import train_test_split
    from sklearn.utils.class_weight import compute_class_weight

    with np.load(args.data) as npz:
        x, y = npz["images"], npz["labels"].reshape(-1).astype(np.int64)
    # the same stratified 70/15/15 split bloodcell makes with this seed
    index = np.arange(len(y))
    rest, test = train_test_split(index, test_size=0.15, random_state=args.seed, stratify=y)
    train, val = train_test_split(rest, test_size=0.15 / 0.85, random_state=args.seed, stratify=y[rest])
    keras.utils.set_random_seed(args.seed)

    augment = keras.Sequential(
        [
            layers.RandomFlip("horizontal"),
            layers.RandomRotation(0.35, fill_mode="reflect"),
            layers.RandomBrightness(0.1, value_range=(0, 255)),
            layers.RandomTranslation(0.075, 0.075, fill_mode="reflect"),
            layers.RandomZoom(0.15, fill_mode="reflect"),
        ]
    )

    def dataset(idx, training):
        ds = tf.data.Dataset.from_tensor_slices((x[idx], y[idx]))
        if training:
            ds = ds.shuffle(len(idx), seed=args.seed)
        ds = ds.batch(64).map(lambda a, b: (tf.cast(a, tf.float32), tf.one_hot(b, 8)))
        if training:
            ds = ds.map(lambda a, b: (augment(a, training=True), b), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    train_ds, val_ds, test_ds = dataset(train, True), dataset(val, False), dataset(test, False)
    backbone = keras.applications.MobileNet(
        alpha=0.25,
        include_top=False,
        weights=str(WEIGHTS),
        input_shape=(args.size, args.size, 3),
        pooling="avg",
    )
    inputs = keras.Input((96, 96, 3))
    h = layers.Resizing(args.size, args.size)(inputs)
    h = layers.Rescaling(1 / 127.5, offset=-1)(h)
    h = backbone(h, training=False)  # BatchNorm stays in inference mode, as in the preset
    for units, rate in ((256, 0.2), (128, 0.1)):
        h = layers.Dense(units, use_bias=False)(h)
        h = layers.BatchNormalization()(h)
        h = layers.LeakyReLU(0.05)(h)
        h = layers.Dropout(rate)(h)
    model = keras.Model(inputs, layers.Dense(8, activation="softmax")(h))
    weights = dict(enumerate(compute_class_weight("balanced", classes=np.arange(8), y=y[train])))
    deadline = time.monotonic() + 60 * args.minutes

    class Deadline(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if time.monotonic() >= deadline:  # never reset the flag: early stopping may have set it
                self.model.stop_training = True

    def fit(lr, decay_steps, decay_rate, epochs, initial_epoch, patience):
        schedule = keras.optimizers.schedules.ExponentialDecay(lr, decay_steps, decay_rate)
        model.compile(
            optimizer=keras.optimizers.Adam(schedule), loss="categorical_crossentropy", metrics=["accuracy"]
        )
        stop = keras.callbacks.EarlyStopping(
            monitor="val_accuracy", patience=patience, restore_best_weights=True
        )
        return model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs,
            initial_epoch=initial_epoch,
            class_weight=weights,
            callbacks=[stop, Deadline()],
            verbose=2,
        )

    tic = time.perf_counter()
    backbone.trainable = False
    history = fit(1e-3, 1000, 0.95, args.epochs, 0, 5)
    done = len(history.epoch)
    if args.finetune_epochs and time.monotonic() < deadline:
        backbone.trainable = True
        for layer in backbone.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False
        done += len(fit(5e-4, 150, 0.9, done + args.finetune_epochs, done, 12).epoch)
    fit_seconds = time.perf_counter() - tic
    probabilities = model.predict(test_ds.map(lambda a, b: a), verbose=0)
    accuracy = float(np.mean(probabilities.argmax(1) == y[test]))
    print(
        f"plain Keras: test accuracy {accuracy:.4f} on {len(test)} held-out images, {done} epochs, "
        f"{fit_seconds:.1f} s in fit (budget {args.minutes} min)"
    )


if __name__ == "__main__":
    main()
