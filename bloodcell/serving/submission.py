"""The competition submission bundle: ``model.py`` (`bloodcell.serving.submission_template`) and
``model.keras`` beside it, checked by loading the bundle from a scratch folder and running it on a blank
batch before the zip is written.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from bloodcell import NUM_CLASSES
from bloodcell.core import outputs
from bloodcell.core.errors import UserError
from bloodcell.core.outputs import atomic_path

TEMPLATE = Path(__file__).with_name("submission_template.py")


MODEL_FILE = "model.keras"  # the name model.py loads


COMPETITION_SHAPE = (96, 96, 3)


def check_output(output: str | None, overwrite: bool) -> Path:
    return outputs.check_output(output, overwrite, (".zip",), "<file.zip>")


def _keras_file_in(folder: Path) -> Path | None:
    """The native Keras file of an MLflow keras-flavor model folder (``data/model.keras``)."""
    found = sorted(folder.rglob("*.keras"))
    return found[0] if len(found) == 1 else None


def export_keras_file(spec: str, dest: Path) -> Path:
    """Write the model ``spec`` names to ``dest`` (a .keras file): copied byte for byte when it already is
    one (a .keras path or an MLflow keras model), else loaded and saved again."""
    import mlflow

    from bloodcell.serving.loading import resolve_model_uri

    uri = resolve_model_uri(spec)
    local = Path(uri)
    if local.is_file() and local.suffix == ".keras":
        shutil.copyfile(local, dest)
        return dest
    if not local.exists():  # a models:/ or runs:/ URI
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest.parent / "mlflow"))
        )
    keras_file = _keras_file_in(local) if local.is_dir() else None
    if keras_file is not None:
        shutil.copyfile(keras_file, dest)
        return dest
    from bloodcell.serving.loading import load_model  # an .h5 file or another flavor layout: re-save

    load_model(str(local)).save(dest)
    return dest


def check_bundle(folder: Path) -> tuple[int | None, int | None]:
    """Import the bundle's model.py from ``folder`` and predict a blank competition batch; return the
    model's input size (H, W) (None where the model takes any size)."""
    spec = importlib.util.spec_from_file_location("bloodcell_submission_check", folder / "model.py")
    assert spec is not None and spec.loader is not None  # a .py file path always has a loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        model = module.Model()
        ids = model.predict(np.zeros((2, *COMPETITION_SHAPE), dtype=np.uint8))
    except Exception as err:  # the bundle would fail in the competition too
        raise UserError(
            f"the bundle does not work: {type(err).__name__}: {err}; is the model a "
            "bloodcell classifier (input (H, W, 3) pixels 0-255, output 8 probabilities)?"
        ) from None
    if np.shape(ids) != (2,) or not np.all((ids >= 0) & (ids < NUM_CLASSES)):
        raise UserError(
            f"the bundle's predict returned {ids!r}, expected 2 class ids 0-{NUM_CLASSES - 1}; "
            "is the model a bloodcell classifier with 8 outputs?"
        )
    return model.height, model.width


def build_submission(spec: str, output: Path) -> tuple[int | None, int | None]:
    """model.py + model.keras, checked, zipped to ``output``; returns the model's input size."""
    with tempfile.TemporaryDirectory(prefix="bloodcell-submit-") as scratch:
        bundle = Path(scratch) / "bundle"
        bundle.mkdir()
        shutil.copyfile(TEMPLATE, bundle / "model.py")
        export_keras_file(spec, bundle / MODEL_FILE)
        size = check_bundle(bundle)
        with (
            atomic_path(output) as partial,
            zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf,
        ):
            for name in ("model.py", MODEL_FILE):
                zf.write(bundle / name, arcname=name)
    return size
