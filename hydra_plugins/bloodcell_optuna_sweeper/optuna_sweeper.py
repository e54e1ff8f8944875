"""The Hydra-facing sweeper class; the work is in ``_impl`` (imported when a sweep starts)."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class BloodcellOptunaSweeper(Sweeper):
    """Runs an Optuna study with Hydra's launcher: ask a batch of ``n_jobs`` trials, launch them as
    jobs, tell Optuna what each returned (a value, a prune or an error), until ``n_trials`` exist."""

    def __init__(self, **options: Any) -> None:
        from .config import options_from

        self.options = options_from(options)
        self._impl: Any | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from ._impl import OptunaSweep

        self._impl = OptunaSweep(
            self.options, hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.hydra_context, self.config, self.launcher = hydra_context, config, self._impl.launcher

    def sweep(self, arguments: list[str]) -> Any:
        assert self._impl is not None, "setup() first"
        return self._impl.run(arguments)
