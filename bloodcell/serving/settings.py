"""The settings of ``python -m bloodcell.promote`` (conf/promote.yaml with its gate, conf/gate/), as one
object: `promote_settings` validates the composed config once, in the command, and
`bloodcell.serving.promotion.promote` and its gates read their values from what it returns. Every key is
required here: conf/promote.yaml and conf/gate/*.yaml hold the defaults."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator, model_validator

from bloodcell.core.errors import UserError
from bloodcell.core.settings import Group, fix, validated


class GateSettings(Group):
    """conf/gate/<name>.yaml: ``mcnemar`` (McNemar's exact test at ``alpha`` and no class's recall down by
    more than ``max_class_drop``) or ``metric`` (a higher metric; it has neither value)."""

    name: str
    alpha: float | None = None
    max_class_drop: float | None = None

    @model_validator(mode="after")
    def _known_and_in_range(self) -> GateSettings:
        if self.name not in ("mcnemar", "metric"):  # bloodcell.serving.gates.GATES
            raise ValueError(f"gate={self.name!r} is unknown; use gate=mcnemar (statistical) or gate=metric")
        if self.name == "mcnemar":
            alpha, drop = self.alpha, self.max_class_drop
            if alpha is None or drop is None or not 0 < alpha < 1 or not 0 <= drop <= 1:
                raise ValueError(
                    f"gate.alpha={alpha} must be in (0, 1) and gate.max_class_drop={drop} in [0, 1] "
                    "(a recall fraction: 0.02 = 2 points)"
                )
        return self


class PromoteTracking(Group):
    """The ``tracking`` group as promote reads it: the experiment whose runs compete (none with ``run=``)."""

    experiment: str | None


class PromoteSettings(Group):
    """conf/promote.yaml (``python -m bloodcell.promote``) with its gate."""

    tracking: PromoteTracking
    sweep: str | None
    run: str | None
    metric: str = fix("a final run metric, e.g. metric=best_val_accuracy", min_length=1)
    model_name: str | None
    alias: str
    eval: str | None
    force: bool
    gate: GateSettings

    @field_validator("eval")
    @classmethod
    def _exists(cls, eval_path: str | None) -> str | None:
        from bloodcell.data import resolve_path

        if eval_path and not resolve_path(eval_path).exists():
            raise ValueError(f"eval={eval_path} not found; give a labelled .npz or a folder of class folders")
        return eval_path

    @model_validator(mode="after")
    def _valid_names(self) -> PromoteSettings:
        from bloodcell.serving.registry import DEFAULT_MODEL_NAME, check_names

        try:
            check_names(self.model_name or DEFAULT_MODEL_NAME, self.alias)
        except UserError as err:
            raise ValueError(str(err)) from None
        return self

    def recorded(self) -> dict[str, Any]:
        """What a gate decision is written with (``gate.<key>`` tags of the model version)."""
        values: dict[str, Any] = {"metric": self.metric, "force": self.force}
        if self.gate.name == "mcnemar":
            gate = self.gate
            values |= {"alpha": gate.alpha, "max_class_drop": gate.max_class_drop, "eval": self.eval or ""}
        return values


def promote_settings(cfg: Any) -> PromoteSettings:
    """A composed promote config (or a plain dict of the same keys) as settings, or a UserError whose one
    line names the first bad value, before the tracking store is touched."""
    return validated(cfg, PromoteSettings)
