"""Predicting with a loaded model: reading images (npz, a folder, one file) and checking them against the
model, class probabilities for arrays (with test-time augmentation when asked), and writing them as CSV
or .npy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bloodcell import CLASS_NAMES, NUM_CLASSES
from bloodcell.core import outputs
from bloodcell.core.errors import UserError
from bloodcell.core.outputs import atomic_path

if TYPE_CHECKING:
    pass


OUTPUT_SUFFIXES = (".csv", ".npy")


@dataclass
class Images:
    images: np.ndarray  # uint8 (N, H, W, 3)
    names: list[str]  # per image: file path relative to the input, or the npz index
    labels: np.ndarray | None  # int64 (N,) when the input carries them


def read_images(path: str | Path) -> Images:
    """An npz (``images``, optional ``labels``), a folder of images, or one image file."""
    from bloodcell.data import resolve_path
    from bloodcell.data.formats import IMAGE_SUFFIXES, open_npz, read_image

    given = path
    path = resolve_path(path)
    if not path.exists():
        raise UserError(f"input {given} not found; give an .npz file, a folder of images or an image file")
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
        images = [read_image(f)[0] for f in files]
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise UserError(
                f"{path}: images have different sizes {sorted(shapes)[:3]}; resize them to the "
                "size the model was trained on"
            )
        return Images(np.stack(images), [str(f.relative_to(path)) for f in files], None)
    if path.suffix.lower() == ".npz":
        with open_npz(path) as npz:
            key = "images" if "images" in npz.files else (npz.files[0] if len(npz.files) == 1 else None)
            if key is None:
                raise UserError(
                    f"{path}: no array 'images' (found {npz.files}); save the images as "
                    "np.savez(path, images=...)"
                )
            images = npz[key]
            labels = npz["labels"].reshape(-1) if "labels" in npz.files else None
        if labels is not None and (len(labels) != len(images) or labels.dtype.kind not in "iu"):
            labels = None  # not usable as class ids: predict without them
        return Images(
            images, [str(i) for i in range(len(images))], None if labels is None else labels.astype(np.int64)
        )
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return Images(read_image(path), [path.name], None)
    raise UserError(
        f"input {path} is not an .npz, a folder or an image ({', '.join(sorted(IMAGE_SUFFIXES))})"
    )


def check_images(images: np.ndarray, model_shape: tuple, source: str) -> None:
    """Images the model can take: uint8 (N, H, W, 3) with the model's H and W."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{source}: images have shape {images.shape}, expected (N, H, W, 3) RGB")
    if len(images) == 0:
        raise UserError(f"{source}: holds no images")
    if images.dtype != np.uint8:
        raise UserError(
            f"{source}: images are {images.dtype}, expected uint8 pixel values 0-255; "
            "save them with images.astype('uint8')"
        )
    height, width = model_shape[0], model_shape[1]
    if (height and images.shape[1] != height) or (width and images.shape[2] != width):
        raise UserError(
            f"{source}: images are {images.shape[1]}x{images.shape[2]} but the model takes "
            f"{height}x{width} (the size it was trained on); resize the images to {height}x{width}"
        )


def tta_views(batch: np.ndarray) -> list[np.ndarray]:
    """The flips and 90-degree rotations of a batch (8 views when square, 4 flips otherwise)."""
    flips = [batch, batch[:, :, ::-1], batch[:, ::-1, :], batch[:, ::-1, ::-1]]
    if batch.shape[1] != batch.shape[2]:
        return flips
    rotated = np.rot90(batch, k=1, axes=(1, 2))
    return flips + [rotated, rotated[:, :, ::-1], rotated[:, ::-1, :], rotated[:, ::-1, ::-1]]


def predict_arrays(
    model: Any,
    images: np.ndarray,
    batch_size: int = 64,
    tta: bool = False,
    progress: bool = False,
    resize_to: tuple[int, int] | None = None,
) -> np.ndarray:
    """Softmax probabilities (N, 8) float32 for uint8 images (N, H, W, 3), in batches; with ``tta`` the
    average over flips and 90-degree rotations; with ``resize_to`` (height, width) each batch is resized
    first, as the submission bundle does."""
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be >= 1")
    from tqdm.auto import tqdm

    out = np.empty((len(images), NUM_CLASSES), dtype=np.float32)
    starts = range(0, len(images), batch_size)
    # disable=None: tqdm draws its bar only on a terminal (no carriage returns in a log file)
    for start in tqdm(starts, desc="predict", unit="batch", disable=None if progress else True):
        batch = images[start : start + batch_size].astype(np.float32)
        if resize_to and batch.shape[1:3] != tuple(resize_to):
            from bloodcell.serving.submission_template import resize_images  # (imports Keras)

            height, width = resize_to
            batch = resize_images(batch, (int(height), int(width)))
        views = tta_views(batch) if tta else [batch]
        probs = [np.asarray(model.predict_on_batch(np.ascontiguousarray(v))) for v in views]
        out[start : start + len(batch)] = np.mean(probs, axis=0)
    return out


def write_predictions(
    path: Path,
    probabilities: np.ndarray,
    names: list[str],
    labels: np.ndarray | None = None,
    review: np.ndarray | None = None,
) -> None:
    """One row per image; written under a temporary name and renamed when complete (bloodcell.core.outputs).
    ``review`` (bool per image, from ``review_below``) adds a column ``review``."""
    with atomic_path(path) as partial:
        _write_table(partial, probabilities, names, labels, review)


def _write_table(
    path: Path,
    probabilities: np.ndarray,
    names: list[str],
    labels: np.ndarray | None,
    review: np.ndarray | None = None,
) -> None:
    ids = probabilities.argmax(axis=1)
    if path.suffix == ".npy":
        dtype = [
            ("image", f"U{max(map(len, names))}"),
            ("class_id", np.int64),
            ("class_name", "U16"),
            ("probabilities", np.float32, (NUM_CLASSES,)),
            *([("review", np.bool_)] if review is not None else []),
        ]
        table = np.empty(len(ids), dtype=dtype)
        table["image"], table["class_id"] = names, ids
        table["class_name"] = [CLASS_NAMES[i] for i in ids]
        table["probabilities"] = probabilities
        if review is not None:
            table["review"] = review
        np.save(path, table)
        return
    import csv

    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "image",
                "class_id",
                "class_name",
                *(f"p_{c}" for c in CLASS_NAMES),
                *(["label"] if labels is not None else []),
                *(["review"] if review is not None else []),
            ]
        )
        for row, (name, cid, probs) in enumerate(zip(names, ids, probabilities)):
            writer.writerow(
                [
                    name,
                    int(cid),
                    CLASS_NAMES[cid],
                    *(f"{p:.6f}" for p in probs),
                    *([int(labels[row])] if labels is not None else []),
                    *(["true" if review[row] else "false"] if review is not None else []),
                ]
            )


def check_output(output: str | None, overwrite: bool) -> Path:
    return outputs.check_output(output, overwrite, OUTPUT_SUFFIXES, "<file.csv | file.npy>")


def predict_on(model_uri: str, images: np.ndarray, who: str, batch_size: int = 64) -> np.ndarray:
    """Class probabilities of the model at ``model_uri`` on uint8 images. A model trained on another image
    size cannot take them: UserError (images are not resized here: resizing changes what a cell looks like
    to the model, and a comparison should show each model the images as it was trained to see them)."""
    from bloodcell.serving.loading import load_model, model_image_shape
    from bloodcell.serving.prediction import predict_arrays

    keras_model = load_model(model_uri)
    height, width = model_image_shape(keras_model)[:2]
    if (height and height != images.shape[1]) or (width and width != images.shape[2]):
        raise UserError(
            f"{who} takes {height}x{width} images and cannot take these "
            f"{images.shape[1]}x{images.shape[2]} ones"
        )
    return predict_arrays(keras_model, images, batch_size)
