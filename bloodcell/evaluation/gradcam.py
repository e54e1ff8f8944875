"""What a model looked at: Grad-CAM heat maps (Selvaraju et al. 2017) for any bloodcell Keras model, and
contact sheets of them and of the errors (`sheets`: what every training run logs as ``plots/gradcam.png``
and ``plots/test_errors.png``; `python -m bloodcell.explain` writes the same for any images).

Grad-CAM needs the last convolutional feature map, which in a bloodcell model sits inside the nested
backbone (a Keras model used as one layer). Its tensors belong to the backbone's own graph, so a model
from the outer input to them cannot be cut directly; the call graph is rebuilt instead
(`keras.models.clone_model` reusing every layer), with the backbone replaced by a copy of itself that also
returns the feature map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bloodcell import CLASS_NAMES
from bloodcell.core.errors import UserError

if TYPE_CHECKING:
    import keras
log = logging.getLogger("bloodcell.explain")


#: the most confident errors an error sheet shows (the title gives the full count)
ERRORS_SHOWN = 64


class NoFeatureMap(UserError):
    """The model has no convolutional layer with a spatial (4-D) output to explain."""


def _layers_in_order(model: keras.Model, path: tuple = ()) -> list[tuple[Any, ...]]:
    """(outer model layer, ..., layer) for every layer, nested models opened in place, in graph order."""
    import keras

    found: list[tuple[Any, ...]] = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        found.append((*path, layer))
        if isinstance(layer, keras.Model):
            found += _layers_in_order(layer, (*path, layer))
    return found


def _output_shape(layer: Any) -> tuple | None:
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):  # a layer called more than once has no single output
        return None


def find_feature_layer(model: keras.Model, name: str | None = None) -> tuple[Any, ...]:
    """The path (nested models, then the layer) to the feature map Grad-CAM weighs: the layer named
    ``name`` anywhere in the model, or else the last layer with a spatial output (4-D, more than one
    position) at or after the last convolution, e.g. MobileNet's ``conv_pw_13_relu`` or small_cnn's
    ``conv_block4_relu2`` (after BatchNorm and activation, as Grad-CAM's authors take it)."""
    import keras

    layers = _layers_in_order(model)
    if name is not None:
        named = [path for path in layers if path[-1].name == name]
        if not named:
            raise UserError(f"the model has no layer named {name!r}; leave layer=null to find the last conv")
        shape = _output_shape(named[0][-1])
        if shape is None or len(shape) != 4:
            raise UserError(f"layer {name!r} has output shape {shape}, not a 4-D feature map (N, H, W, C)")
        return named[0]
    convolutions = (
        keras.layers.Conv2D,
        keras.layers.DepthwiseConv2D,
        keras.layers.SeparableConv2D,
        keras.layers.Conv2DTranspose,
    )
    last_conv = max((i for i, path in enumerate(layers) if isinstance(path[-1], convolutions)), default=None)
    if last_conv is None:
        raise NoFeatureMap(
            f"model {model.name} has no convolutional layer: Grad-CAM needs a conv feature map to weigh"
        )
    for path in reversed(layers[last_conv:]):
        shape = _output_shape(path[-1])
        if shape is not None and len(shape) == 4 and (shape[1] or 2) * (shape[2] or 2) > 1:
            return path
    raise NoFeatureMap(f"model {model.name} has no spatial (4-D) output after its last convolution")


def _expose(model: keras.Model, path: tuple[Any, ...], extra: Any = None) -> keras.Model:
    """``model`` as a functional model that returns [feature map at ``path``, (``extra``'s input,)
    model output], sharing all layers and weights with ``model``."""
    import keras

    if isinstance(model, keras.Sequential):
        model = keras.Model(model.inputs, model.outputs)
    target, rest = path[0], path[1:]
    inner = _expose(target, rest) if rest else None
    captured: dict[str, Any] = {}

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if layer is extra:
            captured["extra"] = args[0]
        if inner is not None and layer is target:
            captured["feature"], out = inner(*args, **kwargs)
            return out
        out = layer(*args, **kwargs)
        if layer is target:
            captured["feature"] = out
        return out

    rebuilt = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)
    heads = [captured["feature"], *([captured["extra"]] if extra is not None else [])]
    return keras.Model(rebuilt.inputs, [*heads, rebuilt.output])


def softmax_dense(model: keras.Model) -> Any:
    """The model's last Dense layer with a softmax, when only layers without weights follow it (a
    calibrated model's temperature scaling divides its logits by a constant, which Grad-CAM's scaling to a
    maximum of 1 removes); else None (an ensemble's average: its probabilities are the score)."""
    import keras

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.Dense):
            return layer if getattr(layer.activation, "__name__", "") == "softmax" else None
        if layer.weights or isinstance(layer, keras.Model):
            return None
    return None


@dataclass
class GradCam:
    """A model ready for Grad-CAM: `heatmaps` for any batch of images."""

    model: keras.Model  # images -> [feature map, (pre-softmax features,) probabilities]
    layer: str  # the feature map's layer, as path outer/inner/layer
    #: the output Dense layer when it ends in a softmax: the class score is then its logit (the softmax
    #: saturates for confident images, and the gradient of a probability near 1 vanishes)
    logits: Any = None

    @classmethod
    def of(cls, model: keras.Model, layer: str | None = None) -> GradCam:
        path = find_feature_layer(model, layer)
        logits = softmax_dense(model)
        return cls(_expose(model, path, extra=logits), "/".join(layer.name for layer in path), logits=logits)

    def heatmaps(
        self, images: np.ndarray, classes: np.ndarray | None = None, batch_size: int = 16
    ) -> tuple[np.ndarray, np.ndarray]:
        """Heat maps (N, H, W) float32 in [0, 1] at the images' own size, for class ``classes[i]`` of
        image i (default: the predicted class), and the probabilities (N, 8). Grad-CAM: the feature map's
        channels weighed by the mean gradient of the class score over their positions, summed, ReLU,
        scaled to a maximum of 1 per image (all zeros when nothing speaks for the class), resized
        (bilinear) to the image."""
        import tensorflow as tf

        maps, probs = [], []
        for start in range(0, len(images), batch_size):
            batch = tf.convert_to_tensor(images[start : start + batch_size], dtype=tf.float32)
            with tf.GradientTape() as tape:
                outs = self.model(batch, training=False)
                features, probabilities = outs[0], tf.cast(outs[-1], tf.float32)
                if self.logits is not None:
                    pre = tf.cast(outs[1], self.logits.kernel.dtype)
                    scores = tf.matmul(pre, self.logits.kernel)
                    scores = scores + self.logits.bias if self.logits.use_bias else scores
                else:
                    scores = probabilities
                chosen = (
                    tf.argmax(probabilities, axis=1)
                    if classes is None
                    else tf.constant(classes[start : start + batch_size], tf.int64)
                )
                score = tf.gather(scores, chosen, axis=1, batch_dims=1)
            grads = tf.cast(tape.gradient(score, features), tf.float32)
            features = tf.cast(features, tf.float32)
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
            cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))
            peak = tf.reduce_max(cam, axis=(1, 2, 3), keepdims=True)
            cam = tf.math.divide_no_nan(cam, peak)
            cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")
            maps.append(np.clip(cam.numpy()[..., 0], 0.0, 1.0))
            probs.append(probabilities.numpy())
        return np.concatenate(maps).astype(np.float32), np.concatenate(probs)


def gradcam(
    model: keras.Model, images: np.ndarray, classes: np.ndarray | None = None, layer: str | None = None
) -> np.ndarray:
    """Grad-CAM heat maps (N, H, W) in [0, 1] of ``model`` on uint8/float images (N, H, W, 3), for the
    predicted class or ``classes``; see `GradCam.heatmaps`."""
    return GradCam.of(model, layer).heatmaps(images, classes)[0]


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """The heat map in a matplotlib colormap blended over the image: uint8 (H, W, 3)."""
    import matplotlib

    colours = matplotlib.colormaps[cmap](heatmap)[..., :3] * 255.0
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * colours, 0, 255).astype(np.uint8)


def showcase(labels: np.ndarray, probabilities: np.ndarray) -> list[tuple[int, int | None, int | None]]:
    """Per class: (class, its most confident correct image, its most confident wrong image), by index; None
    where there is none."""
    predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    picks: list[tuple[int, int | None, int | None]] = []
    for c in range(len(CLASS_NAMES)):
        right = np.flatnonzero((labels == c) & (predicted == c))
        wrong = np.flatnonzero((labels == c) & (predicted != c))
        picks.append(
            (
                c,
                int(right[confidence[right].argmax()]) if len(right) else None,
                int(wrong[confidence[wrong].argmax()]) if len(wrong) else None,
            )
        )
    return picks


class Sheet:
    """A grid of image tiles, each under its caption, with a title above, drawn straight into one picture
    with Pillow. Matplotlib drew it before (a subplot per tile, then one axes): drawing and writing the two
    sheets of a run took it 1.1 s of the run's wall; Pillow draws and writes both in a tenth of that
    (``python benchmarks/overhead.py``)."""

    #: pixels of a tile's side on the page (tiles are enlarged by a whole factor, pixels kept square)
    TILE = 190
    #: pixel sizes of a caption's and of the title's font, and the margin around the title
    CAPTION_FONT, TITLE_FONT, MARGIN = 11, 15, 8
    #: the caption band above a tile (two lines of caption), as a share of the tile's height
    CAPTION_BAND = 0.45 / 1.9

    def __init__(self, rows: int, columns: int, height: int, width: int) -> None:
        self.rows, self.columns, self.height, self.width = rows, columns, height, width
        # the caption band and the gap between tiles, in image pixels
        self.band = round(height * self.CAPTION_BAND)
        self.gap = max(1, round(width * 0.05))
        shape = (rows * (self.band + height), columns * (width + self.gap), 3)
        self.canvas = np.full(shape, 255, dtype=np.uint8)
        #: (x, y, text, colour, anchor) in canvas pixels; anchor "bottom" (a caption) or "center" (a note)
        self.texts: list[tuple[float, float, str, str, str]] = []
        self.title = ""

    def _corner(self, row: int, column: int) -> tuple[int, int]:
        return row * (self.band + self.height) + self.band, column * (self.width + self.gap)

    def put(self, row: int, column: int, image: np.ndarray, caption: str, colour: str = "black") -> None:
        """``image`` (H, W, 3; uint8, or float 0-255) in the tile at (row, column), ``caption`` above it."""
        top, left = self._corner(row, column)
        pixels = np.clip(np.asarray(image, dtype=np.float32), 0, 255).astype(np.uint8)
        self.canvas[top : top + self.height, left : left + self.width] = pixels[..., :3]
        self.texts.append((left + self.width / 2, top - 1, caption, colour, "bottom"))

    def note(self, row: int, column: int, text: str) -> None:
        """``text`` in the middle of an empty tile."""
        top, left = self._corner(row, column)
        self.texts.append((left + self.width / 2, top + self.height / 2, text, "black", "center"))

    def titled(self, title: str) -> Sheet:
        """This sheet with ``title`` (up to three lines) at the top of the page."""
        self.title = title
        return self

    @property
    def scale(self) -> int:
        """How many page pixels a canvas pixel takes, each way."""
        return max(1, round(self.TILE / max(self.width, 1)))

    def render(self) -> Any:
        """The page as a Pillow image (RGB): the title, then the canvas enlarged by `scale`, the captions
        centred above their tiles."""
        from PIL import Image, ImageDraw, ImageFont

        scale = self.scale
        caption_font = ImageFont.load_default(self.CAPTION_FONT)
        title_font = ImageFont.load_default(self.TITLE_FONT)
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        title_box = measure.multiline_textbbox((0, 0), self.title, font=title_font, align="center")
        header = round(title_box[3]) + 2 * self.MARGIN if self.title else 0
        grid = Image.fromarray(self.canvas).resize(
            (self.canvas.shape[1] * scale, self.canvas.shape[0] * scale), Image.Resampling.NEAREST
        )
        page = Image.new("RGB", (grid.width, grid.height + header), "white")
        page.paste(grid, (0, header))
        draw = ImageDraw.Draw(page)
        if self.title:
            width = title_box[2] - title_box[0]
            corner = ((page.width - width) / 2, self.MARGIN)
            draw.multiline_text(corner, self.title, fill="black", font=title_font, align="center")
        for x, y, text, colour, anchor in self.texts:
            box = draw.multiline_textbbox((0, 0), text, font=caption_font, align="center")
            width, height = box[2] - box[0], box[3] - box[1]
            left = x * scale - width / 2
            top = header + y * scale - (height + 2 if anchor == "bottom" else height / 2) - box[1]
            draw.multiline_text((left, top), text, fill=colour, font=caption_font, align="center")
        return page

    def png(self) -> bytes:
        """The page as PNG bytes (zlib's fastest level: PNG's default took several times as long to write,
        for files 10-15% smaller)."""
        import io

        buffer = io.BytesIO()
        self.render().save(buffer, format="png", compress_level=1)
        return buffer.getvalue()

    def save(self, path: str | Path) -> None:
        """The page as a PNG file at ``path``."""
        Path(path).write_bytes(self.png())


def _caption(probabilities: np.ndarray, i: int, label: int | None) -> str:
    p = int(probabilities[i].argmax())
    said = f"pred {CLASS_NAMES[p]} {probabilities[i, p]:.2f}"
    return said if label is None else f"true {CLASS_NAMES[label]}\n{said}"


def gradcam_sheet(
    cam: GradCam, images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, title: str
) -> Sheet:
    """One row per class: its most confident correct and most confident wrong image, each as the image and
    its heat map (for the predicted class) overlaid; one gradient pass over at most 16 images."""
    picks = showcase(labels, probabilities)
    chosen = [i for _, right, wrong in picks for i in (right, wrong) if i is not None]
    maps = dict(zip(chosen, cam.heatmaps(images[chosen])[0])) if chosen else {}
    sheet = Sheet(len(picks), 4, *images.shape[1:3])
    for row, (c, right, wrong) in enumerate(picks):
        for col, (i, what) in enumerate(((right, "correct"), (wrong, "wrong"))):
            if i is None:
                sheet.note(row, 2 * col, f"no {what}\n{CLASS_NAMES[c]}")
                continue
            sheet.put(row, 2 * col, images[i], _caption(probabilities, i, int(labels[i])))
            colour = "green" if what == "correct" else "red"
            sheet.put(row, 2 * col + 1, overlay(images[i], maps[i]), f"{what}: Grad-CAM", colour)
    return sheet.titled(f"{title}\nper class: most confident correct | wrong\nfeature map {cam.layer}")


def gradcam_grid(cam: GradCam, images: np.ndarray, names: list[str], title: str, columns: int = 4) -> Sheet:
    """Every image (unlabelled input) beside its heat map for the predicted class, captioned with its name
    (file, or index in the npz)."""
    maps, probabilities = cam.heatmaps(images)
    sheet = Sheet(-(-len(images) // columns), 2 * columns, *images.shape[1:3])
    for i in range(len(images)):
        r, c = divmod(i, columns)
        sheet.put(r, 2 * c, images[i], f"{names[i][-24:]}\n{_caption(probabilities, i, None)}")
        sheet.put(r, 2 * c + 1, overlay(images[i], maps[i]), "")
    return sheet.titled(f"{title}\nfeature map {cam.layer}")


def errors_sheet(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, what: str = "test", columns: int = 8
) -> Sheet:
    """The errors, most confident first (at most `ERRORS_SHOWN`), captioned with true and predicted class
    and the predicted class's probability; the title counts them all."""
    predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:ERRORS_SHOWN]
    sheet = Sheet(max(1, -(-len(shown) // columns)), columns, *images.shape[1:3])
    for k, i in enumerate(shown):
        sheet.put(*divmod(k, columns), images[i], _caption(probabilities, int(i), int(labels[i])))
    if not len(wrong):
        sheet.note(0, 0, "no errors")
    more = f", the {len(shown)} most confident shown" if len(shown) < len(wrong) else ""
    return sheet.titled(f"{len(wrong)} {what} errors of {len(labels)} images{more}")


def sheets(
    model: keras.Model, images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, what: str = "test"
) -> dict[str, Sheet]:
    """What a run logs: the error sheet, and the Grad-CAM sheet unless Grad-CAM cannot run on this model
    (then a warning: a diagnostic plot never fails a run)."""
    drawn = {"errors": errors_sheet(images, labels, probabilities, what)}
    try:
        cam = GradCam.of(model)
        drawn["gradcam"] = gradcam_sheet(cam, images, labels, probabilities, f"Grad-CAM, {what} images")
    except Exception as err:  # any failure: the sheet is optional, the run's results are not
        log.warning("no Grad-CAM sheet: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)
    return drawn
