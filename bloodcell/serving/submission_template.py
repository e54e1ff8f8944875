"""Competition submission: a Keras blood-cell classifier (made by `python -m bloodcell.submit`).

    from model import Model
    ids = Model().predict(X)   # X: uint8 (N, 96, 96, 3) -> class ids (N,)

Depends on numpy and Keras 3 / TensorFlow only; the model file lies beside this one.
Class ids: 0 basophil, 1 eosinophil, 2 erythroblast, 3 ig, 4 lymphocyte, 5 monocyte, 6 neutrophil,
7 platelet.
"""

import os

import numpy as np

try:  # Keras 3 (the model is in the Keras 3 format)
    import keras
except ImportError:  # an environment with tf.keras only
    from tensorflow import keras

MODEL_FILE = "model.keras"
BATCH_SIZE = 64
EPSILON = 1e-7  # probabilities are clipped to [EPSILON, 1] before the log: a 0 would give -inf


@keras.saving.register_keras_serializable(package="bloodcell")
class TemperatureScaling(keras.layers.Layer):
    """Calibrated probabilities from probabilities: softmax(log(clip(p)) / temperature).

    The last layer of the calibrated bloodcell models logged before issue 27; newer ones hold no custom
    layer (their temperature is folded into the last Dense layer), and only these older models need it.
    It is defined in this file, which ships as the submission's model.py, so the submission loads such a
    model with Keras alone; bloodcell imports it from here. On a softmax output it equals
    dividing the logits by the temperature (the log undoes the softmax up to a constant the next softmax
    removes), so the class order, hence the predicted class, never changes."""

    def __init__(self, temperature: float = 1.0, **kwargs: "object") -> None:
        kwargs.setdefault("dtype", "float32")  # under a mixed-precision policy too: the output is float32
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def call(self, probabilities: "object") -> "object":
        ops = keras.ops
        clipped = ops.clip(ops.cast(probabilities, "float32"), EPSILON, 1.0)
        return ops.softmax(ops.log(clipped) / self.temperature, axis=-1)

    def get_config(self) -> "dict":
        return {**super().get_config(), "temperature": self.temperature}


class Model:
    def __init__(self, path: "str | None" = None) -> None:  # quoted: any Python 3 runs this file
        """Load the model from ``path`` (default: the folder holding this file)."""
        folder = path or os.path.dirname(os.path.abspath(__file__))
        self.model = keras.models.load_model(os.path.join(folder, MODEL_FILE), compile=False)
        self.height, self.width = self.model.input_shape[1:3]

    def predict(self, X: "np.ndarray") -> "np.ndarray":
        """Class ids (N,) int64 for images X uint8 (N, H, W, 3), pixel values 0-255.

        Images of another size than the model's fixed input size are resized to it first (bilinear)."""
        X = np.asarray(X)
        if X.ndim == 3:  # one image
            X = X[None]
        ids = []
        for start in range(0, len(X), BATCH_SIZE):
            batch = X[start : start + BATCH_SIZE].astype(np.float32)
            if self.height and self.width and batch.shape[1:3] != (self.height, self.width):
                batch = resize_images(batch, (self.height, self.width))
            probabilities = np.asarray(self.model.predict_on_batch(batch))
            ids.append(probabilities.argmax(axis=1))
        return np.concatenate(ids).astype(np.int64) if ids else np.zeros((0,), dtype=np.int64)


def resize_images(batch: "np.ndarray", size: "tuple[int, int]") -> "np.ndarray":
    """float32 images (N, H, W, 3) resized (bilinear) to size (height, width); bloodcell's predict uses the
    same function, so both give the same answer for images of another size than the model's."""
    if hasattr(keras, "ops"):  # Keras 3
        return np.asarray(keras.ops.image.resize(batch, size))
    import tensorflow as tf

    return tf.image.resize(batch, size).numpy()
