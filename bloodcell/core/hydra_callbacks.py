"""Hydra callbacks of every command config (``hydra.callbacks`` in conf/*.yaml).

`MaskSavedSecrets`: Hydra writes a job's ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` (and
a multirun's ``multirun.yaml``) from the config as written, before any bloodcell code runs, so a password
typed on the command line (``tracking.uri=http://alice:pw@host:5000``, a storage URL) would be saved in
plain text. The callback rewrites those files with every URL masked by `bloodcell.core.redaction` as soon
as the job starts; the job's config in memory keeps the real values. Passing a secret as
``${oc.env:VARIABLE}`` is still the better way: then it is never on disk at all (docs/configuration.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bloodcell.core.outputs import atomic_path
from bloodcell.core.redaction import mask_secrets

JOB_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def mask_saved_config(path: Path) -> bool:
    """Rewrite the YAML file ``path`` (a config Hydra saved) with every URL's password and credential
    parameters masked, interpolations kept as written; True when something was masked."""
    if not path.is_file():
        return False
    saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    masked = mask_secrets(saved)
    if masked == saved:
        return False
    with atomic_path(path) as partial:
        partial.write_text(OmegaConf.to_yaml(OmegaConf.create(masked)), encoding="utf-8")
    return True


class MaskSavedSecrets(Callback):
    """Masks the passwords in the files Hydra saved for a job and a multirun (module docstring)."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra = config.hydra
        if hydra.output_subdir is not None:
            folder = Path(str(hydra.runtime.output_dir)) / str(hydra.output_subdir)
            for name in JOB_FILES:
                mask_saved_config(folder / name)
        self._mask_multirun(config)  # Hydra's basic sweeper wrote it before launching this job

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._mask_multirun(config)

    @staticmethod
    def _mask_multirun(config: DictConfig) -> None:
        if str(OmegaConf.select(config, "hydra.mode", default="")).endswith("MULTIRUN"):
            mask_saved_config(Path(str(config.hydra.sweep.dir)) / "multirun.yaml")
