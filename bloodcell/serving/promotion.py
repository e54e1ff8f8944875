"""Promotion of a finished run: rank, register its logged model as a version of the model name, and move
the alias when the gate lets it (or when forced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bloodcell.serving.gates import GATES, Decision, holder_provenance, record_decision
from bloodcell.serving.registry import (
    DEFAULT_MODEL_NAME,
    alias_holder,
    best_run,
    check_names,
    finished_runs,
    given_run,
    register,
    run_model_name,
)

if TYPE_CHECKING:
    from bloodcell.serving.settings import PromoteSettings


@dataclass
class Promotion:
    """What promote did: the version it registered (or found) and whether the alias moved, and why."""

    run_id: str
    version: str
    created: bool
    alias_moved: bool
    reason: str
    value: float
    model_name: str = DEFAULT_MODEL_NAME
    #: what the gate printed: contingency table, p-value, per-class recall differences
    details: str = ""


def promote(client: Any, settings: PromoteSettings) -> Promotion:
    """Rank the runs ``settings`` name, register the best one's model, and move the alias when the gate
    (``settings.gate``) lets it or ``settings.force``. The settings are checked already
    (bloodcell.core.settings.promote_settings); what only the store can say is checked here, before
    anything is registered."""
    metric, alias = settings.metric, settings.alias
    experiment: str | None
    if settings.run:  # one given run competes alone (an ensemble's, say): in its own experiment
        given, experiment = given_run(client, settings.run)
        run = best_run([given], metric, f"run {settings.run}")
    else:
        experiment, sweep = settings.tracking.experiment, settings.sweep
        where = f"sweep {sweep} in experiment {experiment!r}" if sweep else f"experiment {experiment!r}"
        run = best_run(finished_runs(client, experiment, sweep), metric, where)
    model_name = settings.model_name or run_model_name(run)
    check_names(model_name, alias)
    value = run.data.metrics[metric]
    version, created = register(client, model_name, run, str(experiment), metric)
    holder = alias_holder(client, model_name, alias)
    label = f"{model_name}@{alias}"
    if holder is not None and str(holder.version) == str(version.version):
        decision = Decision(False, f"version {version.version} already holds {label}")
    elif holder is None:
        decision = Decision(True, f"{label} was unset")
    elif settings.force:
        decision = Decision(True, f"force=true ({holder_provenance(client, holder)} loses it unjudged)")
    else:
        decision = GATES[settings.gate.name](client, run, version, holder, settings)
    if holder is None or str(holder.version) != str(version.version):
        record_decision(client, model_name, version, alias, settings.gate.name, decision, settings.recorded())
    if decision.moved:
        client.set_registered_model_alias(model_name, alias, version.version)
    return Promotion(
        run.info.run_id,
        str(version.version),
        created,
        decision.moved,
        decision.reason,
        value,
        model_name,
        decision.details,
    )


def promote_configured(cfg: Any) -> tuple[PromoteSettings, Promotion]:
    """What ``python -m bloodcell.promote`` does with its composed config (conf/promote.yaml), less the
    printing; every bad value is one line before the tracking store is touched. Returns the checked
    settings with the outcome."""
    import mlflow

    from bloodcell.serving.settings import promote_settings
    from bloodcell.tracking import connect

    settings = promote_settings(cfg)
    uri = connect(cfg.tracking)
    return settings, promote(mlflow.MlflowClient(uri), settings)


def expand_experiment_shorthand(overrides: list[str]) -> list[str]:
    """``experiment=<name>`` -> ``tracking.experiment=<name>``. Hydra would read the bare key as a choice
    of the config group conf/experiment/ (train's ``+experiment=...`` overlays) and refuse it."""
    return [f"tracking.{arg}" if arg.startswith("experiment=") else arg for arg in overrides]
