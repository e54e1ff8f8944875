"""Logged models loaded as any MLflow user loads them: in a fresh Python that cannot import bloodcell
(`fresh_load`), for the tests that check that every model bloodcell logs is plain Keras (issue 27).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers import command_environment

#: ``python -I -c FRESH_LOADER images.npy out.npz <model URI>...``: each model loaded with
#: mlflow.pyfunc.load_model and mlflow.keras.load_model (Keras' safe mode on), and its probabilities for the
#: images: pyfunc on float32 (the signature's dtype), Keras on the images as stored (uint8). bloodcell is
#: installed in the environment (editable), so an import hook refuses it: nothing may need it.
FRESH_LOADER = r"""
import sys

class NoBloodcell:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "bloodcell":
            raise ImportError(f"{name}: this process loads bloodcell's models without bloodcell")
        return None

sys.meta_path.insert(0, NoBloodcell())
import numpy as np
import mlflow.keras
import mlflow.pyfunc

images = np.load(sys.argv[1])
out = {}
for i, uri in enumerate(sys.argv[3:]):
    pyfunc = mlflow.pyfunc.load_model(uri)
    model = mlflow.keras.load_model(uri, load_model_kwargs={"safe_mode": True, "compile": False})
    out[f"pyfunc_{i}"] = np.asarray(pyfunc.predict(images.astype(np.float32)))
    out[f"keras_{i}"] = np.asarray(model.predict(images, verbose=0))
    out[f"modules_{i}"] = np.array(sorted({type(l).__module__ for l in model._flatten_layers()}))
    out[f"signature_{i}"] = np.array(str(pyfunc.metadata.signature.inputs.to_dict()))
np.savez(sys.argv[2], **out)
assert not [m for m in sys.modules if m.split(".")[0] == "bloodcell"], "bloodcell was imported"
"""


def plain_env(tracking_uri: str) -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH, no GPU, quiet TensorFlow, the store."""
    env = {k: v for k, v in command_environment().items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return env


def fresh_load(uris: list[str], images: np.ndarray, tracking_uri: str, folder: Path) -> dict[str, dict]:
    """Per model URI: ``pyfunc`` and ``keras`` probabilities (N, 8), the Keras ``modules`` of its layers
    and its input ``signature``, from one fresh ``python -I`` process (in ``folder``) that never imports
    bloodcell."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", images)
    proc = subprocess.run(
        [sys.executable, "-I", "-c", FRESH_LOADER, "images.npy", "out.npz", *uris],
        cwd=folder,
        env=plain_env(tracking_uri),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    with np.load(folder / "out.npz") as out:
        return {
            uri: {
                "pyfunc": out[f"pyfunc_{i}"],
                "keras": out[f"keras_{i}"],
                "modules": set(out[f"modules_{i}"].tolist()),
                "signature": str(out[f"signature_{i}"]),
            }
            for i, uri in enumerate(uris)
        }


def assert_plain_keras(loaded: dict) -> None:
    """Every layer of the model is one of Keras' own (no custom class, no Lambda)."""
    assert all(m.startswith("keras.") for m in loaded["modules"]), loaded["modules"]
