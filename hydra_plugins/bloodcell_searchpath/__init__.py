"""Makes the project's top-level ``sweeps/`` folder the config group ``sweeps`` of bloodcell's apps, so
that ``python -m bloodcell.train -m +sweeps=finetune`` finds sweeps/finetune.yaml.

Only ``sweeps`` is exposed: a plain ``file://<project root>`` search path would also list conf/, tests/,
mlruns/ ... as config groups in ``--help``. Other Hydra apps in the same environment are left alone.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path

from hydra._internal.core_plugins import file_config_source
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins import search_path_plugin
from hydra.plugins.config_source import ConfigLoadError, ConfigResult

GROUP = "sweeps"
SCHEME = "bloodcell-sweeps"
#: the repository root (where bloodcell/, conf/ and sweeps/ live), as bloodcell.PROJECT_ROOT
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class SweepsConfigSource(file_config_source.FileConfigSource):
    """A file config source that shows only the ``sweeps`` folder of the directory it points at."""

    @staticmethod
    def scheme() -> str:
        return SCHEME

    @staticmethod
    def _inside(config_path: str) -> bool:
        path = config_path.strip("/")
        return path == GROUP or path.startswith(GROUP + "/")

    def is_group(self, config_path: str) -> bool:
        return (config_path.strip("/") == "" or self._inside(config_path)) and super().is_group(config_path)

    def is_config(self, config_path: str) -> bool:
        return self._inside(config_path) and super().is_config(config_path)

    def list(self, config_path: str, results_filter: ObjectType | None) -> builtins.list[str]:
        if config_path.strip("/") == "":
            wanted = results_filter in (None, ObjectType.GROUP)
            return [GROUP] if wanted and super().is_group(GROUP) else []
        return super().list(config_path, results_filter) if self._inside(config_path) else []

    def load_config(self, config_path: str) -> ConfigResult:
        if not self._inside(config_path):
            raise ConfigLoadError(f"Config not found : {config_path} (only {GROUP}/ is served here)")
        return super().load_config(config_path)


class BloodcellSweepsSearchPath(search_path_plugin.SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        conf_dir = os.path.realpath(PROJECT_ROOT / "conf")
        ours = any(_local_dir(element.path) == conf_dir for element in search_path.get_path())
        if ours:
            search_path.append(provider="bloodcell-sweeps", path=f"{SCHEME}://{PROJECT_ROOT}")


def _local_dir(path: str) -> str | None:
    if path.startswith("file://"):
        path = path[len("file://") :]
    elif "://" in path:
        return None
    return os.path.realpath(path)
