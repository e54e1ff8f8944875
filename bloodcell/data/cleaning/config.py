"""The cleaning settings: conf/cleaning/default.yaml is their only source. Library calls that pass no
config, or only some keys, get that file's values for the rest, so the command line, training and a
notebook all clean with the same numbers."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from bloodcell import PROJECT_ROOT
from bloodcell.core.errors import UserError

#: The file every default comes from (the ``cleaning`` config group of the Hydra entry points).
DEFAULTS_FILE: Path = PROJECT_ROOT / "conf" / "cleaning" / "default.yaml"


@cache
def _load_defaults() -> dict[str, Any]:
    from omegaconf import OmegaConf

    if not DEFAULTS_FILE.is_file():
        raise UserError(
            f"cleaning defaults {DEFAULTS_FILE} not found; the conf/ folder belongs beside bloodcell/"
        )
    loaded = OmegaConf.to_container(OmegaConf.load(DEFAULTS_FILE), resolve=True)
    assert isinstance(loaded, dict)
    return {str(k): v for k, v in loaded.items()}


def defaults() -> dict[str, Any]:
    """A fresh copy of conf/cleaning/default.yaml as plain dicts (safe to modify)."""
    return copy.deepcopy(_load_defaults())


def _overlay(base: dict[str, Any], values: Mapping, where: str) -> None:
    """Update ``base`` in place with ``values``; a key ``base`` does not have is a user error, so a typo
    in an override is reported instead of silently ignored."""
    unknown = set(values) - set(base)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(base)}")
    for key, value in values.items():
        if isinstance(base[key], dict) and isinstance(value, Mapping):
            _overlay(base[key], value, f"{where}.{key}")
        else:
            base[key] = value


def resolve_cfg(cfg: Any = None) -> dict[str, Any]:
    """The defaults overlaid with ``cfg`` (a dict, an OmegaConf node or None), checked."""
    if cfg is not None and not isinstance(cfg, Mapping):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    out = defaults()
    for section, values in (dict(cfg) if cfg else {}).items():
        if section not in out:
            raise UserError(f"cleaning: unknown section {section!r}; known: {sorted(out)}")
        if isinstance(values, Mapping):
            _overlay(out[section], values, f"cleaning.{section}")
    policy = out["duplicates"]["conflicting_labels"]
    if policy not in ("drop_group", "keep_majority"):
        raise UserError(f"cleaning.duplicates.conflicting_labels={policy!r}; use drop_group or keep_majority")
    return out


def config_digest(cleaning_cfg: Any) -> str:
    """A short hash of the resolved cleaning settings (part of the cache key); with the embedding on, also
    of the network it runs (``auto`` weights found or not give different keys)."""
    cfg = resolve_cfg(cleaning_cfg)
    if cfg["embedding"]["enabled"]:
        from bloodcell.data.cleaning.embedding import network_digest

        cfg["embedding"]["network"] = network_digest(cfg["embedding"])
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
