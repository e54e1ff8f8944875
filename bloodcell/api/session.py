"""One API call's life in a long-lived Python process (a notebook kernel): its config composed as the
command would compose it, Hydra's errors as the command's one line, and the process left clean afterwards,
also after an error, so that the next call starts as a fresh command would.

What a command leaves behind and a notebook would trip over: Hydra's global state (a second
``initialize_config_dir`` fails while one is active), Keras' global graph and layer-name counters
(``clear_session``), and an MLflow run still active in the fluent API (the next ``mlflow.start_run`` would
nest under it or refuse)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from bloodcell.core.errors import UserError

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger("bloodcell.api")


def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """``python -m bloodcell.<config_name> <overrides>``'s config (`bloodcell.core.cli.compose`); an
    override Hydra refuses (unknown key, bad syntax, missing group option) is a UserError with Hydra's
    message on one line, as the command prints it before exiting.

    As in a command's job, Hydra's own node is taken out of the config and kept in `HydraConfig` for the
    length of the call (`clean_process` drops it): what a run records as its overrides
    (``overrides.yaml``) it reads there, so a run trained from a notebook keeps them as a command's does."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    cfg = compose_with_hydra(config_name, overrides)
    HydraConfig.instance().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg


def compose_with_hydra(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """The config with Hydra's node (``hydra.sweeper``, ``hydra.overrides.task``, ...), or the UserError."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bloodcell.core.cli import compose as compose_config

    bad = [o for o in overrides if not isinstance(o, str)]
    if bad:
        raise UserError(
            f"overrides are strings as on the command line, e.g. 'trainer.epochs=1'; got {bad[0]!r}"
        )
    try:
        return compose_config(list(overrides), config_name, hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(one_line(str(err))) from None


def one_line(message: str) -> str:
    """Hydra's multi-line messages as the one line a UserError holds (without the config search path
    Hydra appends to a missing option: four lines about its own plugins)."""
    message = message.split("Config search path:")[0]
    return " ".join(line.strip() for line in message.strip().splitlines() if line.strip())


@contextlib.contextmanager
def clean_process() -> Iterator[None]:
    """Run one API call; afterwards (also after an error) no Hydra instance, no Keras session state and no
    active MLflow run are left for the next call to meet."""
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        _end_active_runs("FAILED" if failed else "FINISHED")
        _clear_hydra()
        _clear_keras()


def _end_active_runs(status: str) -> None:
    if "mlflow" not in sys.modules:
        return
    import mlflow

    while (run := mlflow.active_run()) is not None:  # a nested run left open: its parent is open under it
        log.warning("ending MLflow run %s that the call left active", run.info.run_id)
        mlflow.end_run(status)


def _clear_hydra() -> None:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    # what `compose` kept for the call
    HydraConfig.instance().cfg = None


def _clear_keras() -> None:
    if "keras" in sys.modules:  # only a call that used Keras has anything to clear
        import keras

        keras.backend.clear_session()
