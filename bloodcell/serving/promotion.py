"""Promotion of a finished run: rank, register its logged model as a version of the model name, and move
the alias when the gate lets it (or when forced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bloodcell.core.errors import UserError
from bloodcell.serving.gates import (
    GATES,
    Decision,
    holder_provenance,
    metric_gate,
    record_decision,
    statistical_gate,
)
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


def promote(
    client: Any,
    *,
    experiment: str | None,
    metric: str = "best_val_accuracy",
    model_name: str | None = None,
    alias: str = "champion",
    sweep: str | None = None,
    run_id: str | None = None,
    force: bool = False,
    gate: str = "mcnemar",
    alpha: float = 0.05,
    max_class_drop: float = 0.02,
    eval_path: str | None = None,
) -> Promotion:
    check_names(model_name or DEFAULT_MODEL_NAME, alias)
    if gate not in GATES:
        raise UserError(f"gate={gate!r} is unknown; use gate=mcnemar (statistical) or gate=metric")
    if not 0 < alpha < 1 or not 0 <= max_class_drop <= 1:
        raise UserError(
            f"gate.alpha={alpha} must be in (0, 1) and gate.max_class_drop={max_class_drop} in [0, 1] "
            "(a recall fraction: 0.02 = 2 points)"
        )
    if eval_path:
        from bloodcell.data import resolve_path

        if not resolve_path(eval_path).exists():
            raise UserError(f"eval={eval_path} not found; give a labelled .npz or a folder of class folders")
    if run_id:  # one given run competes alone (an ensemble's, say): in its own experiment
        given, experiment = given_run(client, run_id)
        run = best_run([given], metric, f"run {run_id}")
    else:
        where = f"sweep {sweep} in experiment {experiment!r}" if sweep else f"experiment {experiment!r}"
        run = best_run(finished_runs(client, experiment, sweep), metric, where)
    model_name = model_name or run_model_name(run)
    check_names(model_name, alias)
    value = run.data.metrics[metric]
    version, created = register(client, model_name, run, str(experiment), metric)
    holder = alias_holder(client, model_name, alias)
    label = f"{model_name}@{alias}"
    if holder is not None and str(holder.version) == str(version.version):
        decision = Decision(False, f"version {version.version} already holds {label}")
    elif holder is None:
        decision = Decision(True, f"{label} was unset")
    elif force:
        decision = Decision(True, f"force=true ({holder_provenance(client, holder)} loses it unjudged)")
    elif gate == "metric":
        decision = metric_gate(client, value, holder, metric, holder_provenance(client, holder))
    else:
        decision = statistical_gate(
            client, run, version, holder, alpha=alpha, max_class_drop=max_class_drop, eval_path=eval_path
        )
    settings: dict[str, Any] = {"metric": metric, "force": force}
    if gate == "mcnemar":
        settings |= {"alpha": alpha, "max_class_drop": max_class_drop, "eval": eval_path or ""}
    if holder is None or str(holder.version) != str(version.version):
        record_decision(client, model_name, version, alias, gate, decision, settings)
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
