"""What a run records, through one object: the `Recorder` that `bloodcell.tracking.start_run` yields for the
active run. It records what it is handed (metrics, tags, texts, dicts, figures, images, files, a Keras
model) and knows nothing of the domain that made them: the steps that draw a confusion matrix or a Grad-CAM
sheet hand the figure over. "Where do I log a new figure?": here, by name, through `log_figure`.

Every record goes through `Recorder.send`: straight to the store, or, with a remote server, through the
run's outbox (`bloodcell.tracking.outbox`), so that an unreachable server delays records instead of
losing them. `record_to` sends the same kinds of record to a run that is not the active one (a sweep's
parent run, a group run of repeats).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bloodcell.tracking.outbox as outbox
from bloodcell.core.redaction import mask_secrets, mask_text
from bloodcell.tracking.outbox import Outbox


def predictions_path(split: str) -> str:
    """Where a run keeps the final model's predictions on one split (``val`` or ``test``)."""
    return f"predictions/{split}.npz"


@dataclass
class Recorder:
    """The active MLflow run of one training (or ensemble) run, and the one way to record in it."""

    run: Any  # mlflow.entities.Run
    #: with a remote server: where records wait while it cannot be reached (None: straight to the store)
    outbox: Outbox | None = None

    @property
    def run_id(self) -> str:
        return str(self.run.info.run_id)

    @property
    def experiment_id(self) -> str:
        return str(self.run.info.experiment_id)

    def send(self, record: dict[str, Any]) -> None:
        if self.outbox is not None:
            self.outbox.send(record)
        else:
            outbox.apply(self.run_id, record)

    def log_file(self, artifact_path: str, write: Callable[[Path], Any]) -> None:
        """An artifact at ``artifact_path`` (e.g. ``plots/x.png``) whose file ``write(path)`` makes."""
        import tempfile

        folder, name = os.path.split(artifact_path)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            write(local)
            self.send({"kind": "artifact", "path": str(local), "dir": folder or None})

    def log_epoch(self, metrics: dict[str, float], step: int) -> None:
        """One epoch's metrics (``train_*``, ``val_*``, ``learning_rate``) at step = the global epoch.

        The learning curves keep names without a "/" (sweeps, promote, resume and scripts read them), so the
        MLflow UI, which sorts named chart sections first, shows them in its last section, "Model metrics"."""
        self.send({"kind": "metrics", "metrics": metrics, "step": step, "timestamp": int(time.time() * 1000)})

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Run-level figures: test metrics, the best objective, counts."""
        self.send({"kind": "metrics", "metrics": metrics, "step": 0, "timestamp": int(time.time() * 1000)})

    def set_tags(self, tags: dict[str, str]) -> None:
        self.send({"kind": "tags", "tags": {k: mask_text(str(v)) for k, v in tags.items()}})

    def log_text(self, text: str, artifact_path: str) -> None:
        self.log_file(artifact_path, lambda path: path.write_text(text))

    def log_dict(self, data: dict[str, Any], artifact_path: str) -> None:
        import json

        self.log_text(json.dumps(data, indent=2), artifact_path)

    def log_figure(self, figure: Any, artifact_path: str) -> None:
        """A matplotlib figure as a PNG (closed once written)."""
        import matplotlib.pyplot as plt

        # zlib's fastest level: PNG's default (6) took a third of the time an image sheet costs a run, for
        # files 10-15% smaller
        self.log_file(artifact_path, lambda path: figure.savefig(path, pil_kwargs={"compress_level": 1}))
        plt.close(figure)

    def log_image(self, image: Any, artifact_path: str) -> None:
        """A uint8 (H, W, 3) array as a PNG."""
        from PIL import Image

        # zlib's fastest level, as for every picture a run writes
        self.log_file(artifact_path, lambda path: Image.fromarray(image).save(path, compress_level=1))

    def log_config(self, cfg: Any, overrides: list[str]) -> None:
        """The resolved config and the command-line overrides, as ``config.yaml`` and ``overrides.yaml``,
        with passwords in URLs masked (the run's process has the real values)."""
        from omegaconf import OmegaConf

        plain = mask_secrets(OmegaConf.to_container(cfg, resolve=True))
        self.log_text(OmegaConf.to_yaml(plain), "config.yaml")
        self.log_text(OmegaConf.to_yaml(mask_secrets(list(overrides))), "overrides.yaml")

    def log_inputs(self, records: list[dict[str, Any]]) -> None:
        """The run's data splits as MLflow dataset inputs, from the JSON records that
        `bloodcell.data.mlflow_inputs.dataset_inputs` makes (they travel through the outbox as they are)."""
        self.send({"kind": "inputs", "inputs": records})

    def log_timings(self, seconds: dict[str, float]) -> None:
        """Where a run's time went (``seconds_<part>``), as ``time/seconds_<part>``: a section of their own
        in the MLflow UI's charts, beside the per-epoch ``time/train_images_per_second``."""
        self.log_metrics({f"time/{name}": value for name, value in seconds.items()})

    def log_skipped_images(self, skipped: list[str], source: str) -> None:
        """Image files a folder data set could not read and training left out: metric
        ``data_skipped_images`` and the list as ``data/skipped_images.txt``."""
        self.log_metrics({"data_skipped_images": len(skipped)})
        if skipped:
            self.log_text(
                f"# unreadable image files in {source}, left out\n" + "\n".join(skipped) + "\n",
                "data/skipped_images.txt",
            )

    def log_predictions(
        self,
        split: str,
        labels: Any,
        fingerprint: str,
        data_index: Any,
        probabilities: Any,
        split_fingerprint: str,
    ) -> None:
        """The final model's class probabilities on one split, per image, as ``predictions/<split>.npz``:
        ``index`` (position in the split), ``data_index`` (position in the data set the split was cut
        from), ``labels``, ``probabilities`` (N, 8) float32, and the ``fingerprint`` /
        ``split_fingerprint`` they belong to. Two runs with the same split fingerprint can be compared
        image by image later (``python -m bloodcell.compare``, the champion gate of ``promote``) without
        running either again."""
        import numpy as np

        def write(path: Path) -> None:
            n = len(labels)
            with path.open("wb") as f:  # np.savez_compressed would add ".npz" to a str path without it
                np.savez_compressed(
                    f,
                    index=np.arange(n, dtype=np.int64),
                    data_index=np.asarray(data_index, dtype=np.int64),
                    labels=np.asarray(labels, dtype=np.int64),
                    probabilities=np.asarray(probabilities, dtype=np.float32),
                    fingerprint=np.array(fingerprint),
                    split_fingerprint=np.array(split_fingerprint),
                )

        self.log_file(predictions_path(split), write)

    def log_model(self, model: Any, example_input: Any, example_output: Any, local_dir: Path) -> str:
        """The Keras model as an MLflow model named ``model`` (registrable), with a signature from the given
        examples; returns its URI, also kept as tag ``model_uri``.

        The signature's input is a float32 tensor (-1, H, W, 3) of the data set's image size: the model
        takes cells as the data set stores them, 0-255, and resizes and scales inside. float32, not uint8:
        JSON sent to `mlflow models serve` is cast to it (integers 0-255 are fine), while MLflow's schema
        check refuses any other numpy dtype handed to a pyfunc model in Python (``.astype("float32")``).

        The model is first saved to ``local_dir/model.keras`` (written under a temporary name, then renamed):
        if the upload fails (a full disk, a server gone), the error names that loadable copy, and the run ends
        FAILED with it. The caller deletes the copy with the run's checkpoints once the run finished."""
        import numpy as np

        local_dir.mkdir(parents=True, exist_ok=True)
        local = local_dir / "model.keras"
        partial = local_dir / f"model.tmp-{os.getpid()}.keras"  # Keras wants the extension
        try:
            model.save(partial)
            os.replace(partial, local)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise OSError(f"saving the model locally to {local} failed: {err}") from err
        examples = local_dir / "model_examples.npz"
        example_input = np.asarray(example_input, dtype=np.float32)  # the signature's dtype (see above)
        np.savez(examples, input=example_input, output=example_output)
        if self.outbox is not None:
            self.outbox.send({"kind": "model", "path": str(local), "examples": str(examples)})
            return f"runs:/{self.run_id}/model"
        try:
            info = outbox.log_keras_model(model, example_input, example_output)
        except Exception as err:
            _remove_partial_model(self.run_id)
            raise RuntimeError(
                f"uploading the model to MLflow failed ({err}); a loadable copy is at {local}"
            ) from err
        self.set_tags({"model_uri": info.model_uri})
        return str(info.model_uri)


def _remove_partial_model(run_id: str | None) -> None:
    """After a failed upload to a local artifact folder (a full disk), no truncated model file stays under
    its final name: the run's logged-model folders go. (A server's store is the server's business.)"""
    import shutil
    from urllib.parse import unquote, urlparse

    import mlflow

    active = mlflow.active_run()
    with contextlib.suppress(Exception):
        experiments = [active.info.experiment_id] if active else None  # without one nothing is found
        found = mlflow.search_logged_models(
            experiment_ids=experiments, filter_string=f"source_run_id = '{run_id}'", output_format="list"
        )
        for model in found:
            location = urlparse(model.artifact_location)
            if location.scheme in ("", "file"):
                shutil.rmtree(unquote(location.path), ignore_errors=True)


def record_to(
    run_id: str,
    *,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    step: int = 0,
    artifacts: list[tuple[Path, str | None]] = (),  # type: ignore[assignment]
    status: str | None = None,
) -> None:
    """Records for a run that is not the active training run (the sweep's parent run, a trial's child run
    that the sweeper ends): the same record kinds, sent the same way, in that order."""
    stamp = int(time.time() * 1000)
    records: list[dict[str, Any]] = []
    if params:
        records.append({"kind": "params", "params": mask_secrets(params)})
    if tags:
        records.append({"kind": "tags", "tags": {k: mask_text(str(v))[:5000] for k, v in tags.items()}})
    if metrics:
        records.append({"kind": "metrics", "metrics": metrics, "step": step, "timestamp": stamp})
    records += [{"kind": "artifact", "path": str(path), "dir": folder} for path, folder in artifacts]
    if status:
        records.append({"kind": "end", "status": status})
    for record in records:
        outbox.apply(run_id, record)
