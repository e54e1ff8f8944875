"""`python -m bloodcell.predict`: class ids, names and probabilities for images, from any saved model.

    python -m bloodcell.predict model=models:/bloodcell@champion input=test.npz output=pred.csv
    python -m bloodcell.predict model=models:/bloodcell/3 input=cells/ output=pred.npy tta=true
    python -m bloodcell.predict model=runs:/<run id>/model input=cell.png output=pred.csv
    python -m bloodcell.predict model=path/to/model.keras input=test.npz output=pred.csv

``model`` is a registry URI (``models:/name@alias``, ``models:/name/version``), a logged model
(``models:/m-...``), a run's model (``runs:/<run id>/model``), an MLflow model folder or a ``.keras`` file.
``input`` is an npz (array ``images``, labels optional), a folder of images (flat, or one sub-folder per
class) or one image file. Images of another size than the model's input are resized to it (bilinear),
with a note, as the submission bundle's ``model.py`` does (the same function).

Output: CSV with one row per image (image, class_id, class_name, one probability column per class, and
``label`` when the input had labels), or .npy holding a structured array with fields image, class_id,
class_name, probabilities (8,) (``np.load(path)`` -- no pickle needed). With ``review_below=0.9`` both
also say per image whether its top probability is below 0.9 (``review``: true/false), and the count is
printed: the cells to send to a human.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig

from bloodcell import CLASS_NAMES, NUM_CLASSES, PROJECT_ROOT, outputs
from bloodcell.abstention import review_mask, review_summary
from bloodcell.cli import run_or_exit
from bloodcell.errors import UserError
from bloodcell.outputs import atomic_path

if TYPE_CHECKING:
    import keras

OUTPUT_SUFFIXES = (".csv", ".npy")


@dataclass
class Images:
    images: np.ndarray  # uint8 (N, H, W, 3)
    names: list[str]  # per image: file path relative to the input, or the npz index
    labels: np.ndarray | None  # int64 (N,) when the input carries them


# ---------------------------------------------------------------------------------------------- models


def resolve_model_uri(spec: str, client: Any = None) -> str:
    """Check that ``spec`` names an existing model and return a URI/path MLflow or Keras can load.

    Registry names, aliases, versions and run ids are looked up first so that a typo is one clear line
    instead of an MLflow stack trace."""
    if not spec:
        raise UserError(
            "say which model: model=models:/<name>@<alias> | models:/<name>/<version> | "
            "runs:/<run id>/model | <path to .keras file or MLflow model folder>"
        )
    spec = str(spec)
    if spec.startswith("models:/"):
        import mlflow
        from mlflow.exceptions import MlflowException

        client = client or mlflow.MlflowClient()
        ref = spec[len("models:/") :].strip("/")
        if ref.startswith("m-") and "/" not in ref and "@" not in ref:  # a logged model id
            try:
                client.get_logged_model(ref)
            except MlflowException:
                raise UserError(
                    f"logged model {ref} not found in this tracking store; check the id "
                    "(tag model_uri of the run) or tracking.uri"
                ) from None
            return spec
        name, sep_alias, alias = ref.partition("@")
        name, _, version = name.partition("/") if not sep_alias else (name, "", "")
        try:
            client.get_registered_model(name)
        except MlflowException:
            known = ", ".join(sorted(m.name for m in client.search_registered_models())) or "none"
            raise UserError(
                f"registered model {name!r} not found (registered: {known}); "
                "promote a run first: python -m bloodcell.promote experiment=<name>"
            ) from None
        try:
            if sep_alias:
                client.get_model_version_by_alias(name, alias)
            elif version and version != "latest":
                client.get_model_version(name, version)
        except MlflowException:
            what = f"alias {alias!r}" if sep_alias else f"version {version!r}"
            aliases = sorted(client.get_registered_model(name).aliases or {})
            raise UserError(
                f"registered model {name!r} has no {what} (aliases: {', '.join(aliases) or 'none'}); "
                f"use models:/{name}@<alias> or models:/{name}/<version>"
            ) from None
        return spec
    if spec.startswith("runs:/"):
        import mlflow
        from mlflow.exceptions import MlflowException

        client = client or mlflow.MlflowClient()
        run_id = spec[len("runs:/") :].split("/", 1)[0]
        try:
            client.get_run(run_id)
        except MlflowException:
            raise UserError(
                f"run {run_id!r} not found in this tracking store; check the run id or tracking.uri"
            ) from None
        return spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"model {spec!r} is neither an existing file/folder nor a models:/ or runs:/ URI; "
            "e.g. model=models:/bloodcell@champion"
        )
    if path.is_file() and path.suffix not in (".keras", ".h5"):
        raise UserError(f"model file {path} is not a Keras model (.keras or .h5)")
    if path.is_dir() and not (path / "MLmodel").is_file():
        raise UserError(
            f"model folder {path} has no MLmodel file; point to an MLflow model folder or a .keras file"
        )
    return str(path.resolve())


def set_tracking(tracking_cfg: Any) -> None:
    """Point MLflow at the configured store (without creating an experiment: reading only)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # model files are small, local

    from bloodcell.tracking import connect

    connect(tracking_cfg)


def load_model(spec: str) -> keras.Model:
    """A Keras model from a registry/run URI, an MLflow model folder or a .keras/.h5 file. A file Keras
    refuses (code that safe mode will not run, a damaged archive, not a model) is one UserError line."""
    import zipfile

    uri = resolve_model_uri(spec)
    # Keras finds a layer of a saved model only when its class is registered: calibrated models end with one
    from bloodcell.submission_template import TemperatureScaling  # noqa: F401

    try:
        if Path(uri).is_file():
            import keras

            return keras.saving.load_model(uri, compile=False)
        import mlflow.keras

        return mlflow.keras.load_model(uri)
    except (ValueError, TypeError, OSError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "safe_mode" in str(err):
            raise UserError(
                f"model {spec} holds Python code (a Lambda layer or a custom function) that Keras' safe mode "
                "refuses to load; bloodcell models have none: re-save it without that layer, or use a model "
                "logged by bloodcell.train"
            ) from None
        raise UserError(
            f"model {spec} cannot be loaded as a Keras model ({type(err).__name__}: {first})"
        ) from None


def model_image_shape(model: Any) -> tuple[int | None, int | None, int]:
    shape = model.input_shape
    if isinstance(shape, list):
        shape = shape[0]
    return tuple(shape[1:])


# ---------------------------------------------------------------------------------------------- inputs


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


# ---------------------------------------------------------------------------------------------- predict


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
            from bloodcell.submission_template import resize_images  # (imports Keras)

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
    """One row per image; written under a temporary name and renamed when complete (bloodcell.outputs).
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


def predict(cfg: DictConfig) -> np.ndarray:
    """Everything cheap is checked first (output, input), then the model is loaded once."""
    output = check_output(cfg.output, bool(cfg.overwrite))
    if int(cfg.batch_size) < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be >= 1")
    if not cfg.input:
        raise UserError("say what to predict: input=<file.npz | image folder | image file>")
    below = cfg.get("review_below")
    if below is not None and (
        isinstance(below, bool) or not isinstance(below, (int, float)) or not 0 < below <= 1
    ):
        raise UserError(
            f"review_below={below} must be a top probability in (0, 1], e.g. 0.9, or null for none"
        )
    data = read_images(cfg.input)
    check_images(data.images, (None, None, 3), str(cfg.input))
    set_tracking(cfg.tracking)
    uri = resolve_model_uri(cfg.model)
    model = load_model(uri)
    height, width, _ = model_image_shape(model)
    size = (height, width) if height and width and data.images.shape[1:3] != (height, width) else None
    if size:  # one rule with the submission bundle: resize, and say so
        print(
            f"{cfg.input}: images are {data.images.shape[1]}x{data.images.shape[2]}, the model takes "
            f"{height}x{width}: resized to it (bilinear), as the submit bundle's model.py does"
        )
    probabilities = predict_arrays(
        model, data.images, int(cfg.batch_size), bool(cfg.tta), progress=True, resize_to=size
    )
    review = None if below is None else review_mask(probabilities, float(below))
    write_predictions(output, probabilities, data.names, data.labels, review)
    counts = np.bincount(probabilities.argmax(axis=1), minlength=NUM_CLASSES)
    summary = ", ".join(f"{CLASS_NAMES[c]} {n}" for c, n in enumerate(counts) if n)
    plural, tta = "s" * (len(probabilities) != 1), " (TTA)" if cfg.tta else ""
    print(f"wrote {len(probabilities)} prediction{plural} to {output}{tta}: {summary}")
    if data.labels is not None:
        print(f"accuracy against the input's labels: {(probabilities.argmax(1) == data.labels).mean():.4f}")
    if review is not None and below is not None:
        print(review_summary(review, float(below)))
    return probabilities


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="predict")
def main(cfg: DictConfig) -> None:
    run_or_exit(predict, cfg)


if __name__ == "__main__":
    main()
