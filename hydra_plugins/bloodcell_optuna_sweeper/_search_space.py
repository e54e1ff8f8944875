"""Hydra sweep syntax -> Optuna distributions.

    interval(a, b)              float, uniform on [a, b]
    tag(log, interval(a, b))    float, log-uniform (a > 0)
    int(interval(a, b))         int, uniform on [a, b] (both ends included); tag(log, ...) for log scale
    range(a, b[, step])         int (or float with a float step) on a, a+step, ... < b, like Python's range
    choice(x, y, ...) / x,y,... categorical; shuffle(...) of a range or choice is categorical too

Anything else (``trainer.epochs=3``, ``+experiment=quickstart``) is a fixed override passed to every trial.
"""
# no `from __future__ import annotations`: Hydra execs plugin modules outside sys.modules, which breaks
# dataclasses with string annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bloodcell.core.errors import UserError

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override


@dataclass
class SearchSpace:
    """The parsed sweep: Optuna distributions by parameter name, and the overrides every trial gets."""

    distributions: dict[str, Any] = field(default_factory=dict)
    #: how each searched parameter is written on the command line ("+x" when it adds a key)
    prefixes: dict[str, str] = field(default_factory=dict)
    #: the sweep syntax as written, for the MLflow parent run
    written: dict[str, str] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)

    def overrides_for(self, params: dict[str, Any]) -> list[str]:
        """The command-line overrides of one trial: the fixed ones, then its sampled values. A value of a
        parameter this sweep does not search (a trial sampled before its sweeps file dropped it, run again)
        is forced in with ``++``, which sets a key whether or not the config has it."""
        return self.fixed + [
            f"{self.prefixes.get(name, '++')}{name}={format_value(value)}" for name, value in params.items()
        ]

    def dropped(self, params: dict[str, Any]) -> list[str]:
        """The parameters of ``params`` this sweep does not search."""
        return [name for name in params if name not in self.distributions]


def format_value(value: Any) -> str:
    """A sampled value as a Hydra override value (strings came from the override parser already
    escaped, see `_categorical`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def parse_search_space(arguments: list[str]) -> SearchSpace:
    """Split ``key=value`` overrides into a search space and fixed overrides.

    Raises UserError (one line, naming the parameter) for a sweep Optuna cannot sample from.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    space = SearchSpace()
    fixed: dict[str, str] = {}  # key -> argument; a later override of a key replaces an earlier one
    for argument in arguments:
        try:
            (override,) = parser.parse_overrides([argument])
        except HydraException as err:
            raise UserError(f"cannot parse sweep override '{argument}': {str(err).splitlines()[0]}") from None
        name = override.key_or_group
        written = argument.split("=", 1)[1].strip()
        if not override.is_sweep_override():
            for table in (space.distributions, space.prefixes, space.written):
                table.pop(name, None)
            fixed.pop(name, None)
            fixed[name] = argument
            continue
        if override.package:
            raise UserError(f"cannot search over '{argument}' with a package (@...); drop the @ part")
        try:
            space.distributions[name] = _distribution(override)
        except (ValueError, TypeError) as err:
            raise UserError(f"invalid search space for {name} ({written}): {err}") from None
        fixed.pop(name, None)
        key = override.get_key_element()
        space.prefixes[name] = key[: len(key) - len(name)]
        space.written[name] = written
    space.fixed = list(fixed.values())
    return space


def _distribution(override: "Override") -> Any:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import FloatDistribution, IntDistribution

    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return _categorical(override)
    if isinstance(value, RangeSweep):
        values: list[Any] = list(override.sweep_iterator())  # a range's values are numbers
        if not values:
            raise ValueError("the range is empty")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        unknown = set(value.tags) - {"log"}
        if unknown:
            raise ValueError(f"unknown tag(s) {sorted(unknown)}; the only tag understood is log")
        low, high = value.start, value.end
        if low is None or high is None:  # Hydra's parser gives interval() both ends; its type allows None
            raise ValueError("an interval needs a low and a high end")
        if low > high:
            raise ValueError(f"low {low} is above high {high}")
        if log and low <= 0:
            raise ValueError("log scale needs a low end above 0")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log)
        return FloatDistribution(float(low), float(high), log=log)
    raise ValueError(f"{type(value).__name__} sweeps are not supported")


def _categorical(override: "Override") -> Any:
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution

    # encoded: strings come back quoted/escaped where needed, so "a=<choice>" re-parses to the same value
    choices: list[Any] = list(override.sweep_iterator(transformer=Transformer.encode))  # checked below
    for choice in choices:
        if not isinstance(choice, (str, int, float, bool, type(None))):
            raise ValueError(
                f"choice {choice!r} is a {type(choice).__name__}; choices must be "
                "strings, numbers, booleans or null"
            )
    if len(set(map(repr, choices))) != len(choices):
        raise ValueError("a choice is listed twice")
    return CategoricalDistribution(choices)


def grid_of(space: SearchSpace) -> dict[str, list[Any]]:
    """The grid sampler's search space; UserError for a continuous parameter."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    grid: dict[str, list[Any]] = {}
    for name, dist in space.distributions.items():
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            count = int(round((dist.high - dist.low) / dist.step)) + 1
            grid[name] = [dist.low + i * dist.step for i in range(count)]
        else:
            raise UserError(
                f"the grid sampler needs discrete values, but {name} is "
                f"{space.written[name]}; use choice(...) or range(...)"
            )
    return grid
