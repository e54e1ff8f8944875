"""`python -m bloodcell.promote`: the best finished run -> a registered model version -> maybe the alias.

    python -m bloodcell.promote experiment=effnetb2                       # best of all runs
    python -m bloodcell.promote experiment=effnetb2 sweep=<parent run id> # best trial of one sweep
    python -m bloodcell.promote experiment=effnetb2 eval=held_out.npz     # the gate judges on these images
    python -m bloodcell.promote experiment=effnetb2 gate=metric           # the plain "higher metric" rule
    python -m bloodcell.promote experiment=effnetb2 force=true            # move the alias regardless
    python -m bloodcell.promote run=<run id>                              # that run (an ensemble's, say)

Steps: rank the experiment's FINISHED runs that logged a model by ``metric`` -> register the winner's
logged model as a new version of ``model_name`` (the name the run was trained for: ``bloodcell``, or
``bloodcell-demo`` for the synthetic-data demo preset; or reuse the version already made from that run) ->
move ``alias`` to it only when the gate lets it (or ``force``):

* ``gate=mcnemar`` (default): on the same evaluation images (the test images both runs held out, the
  challenger's test split, or ``eval=<npz>``) McNemar's exact test must say the challenger is better at
  ``gate.alpha`` and no class's recall may fall by more than ``gate.max_class_drop``; a holder that cannot
  even take the challenger's images loses;
* ``gate=metric``: the challenger's ``metric`` beats the holder's, by any margin.

Every decision is written on the challenger's model version as ``gate.*`` tags. Everything the user can
get wrong is checked before the registry is touched.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import hydra
from omegaconf import DictConfig

from bloodcell import PROJECT_ROOT
from bloodcell.cli import run_or_exit
from bloodcell.errors import UserError

#: Run tags copied onto the model version, so the registry alone says where a model came from.
PROVENANCE_TAGS = (
    "data_fingerprint",
    "data_fingerprint_cleaned",
    "split_fingerprint",
    "data_source",
    "git_commit",
    "git_dirty",
    "bloodcell_version",
    "model_uri",
    "trial_number",
)
_ALIAS = re.compile(r"^[\w\-]{1,255}$")
#: the registered model of runs that do not say which (their config has no ``model_name``)
DEFAULT_MODEL_NAME = "bloodcell"
GATES = ("mcnemar", "metric")


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


def higher_is_better(metric: str) -> bool:
    return "loss" not in metric


def _beats(challenger: float, holder: float, metric: str) -> bool:
    return challenger > holder if higher_is_better(metric) else challenger < holder


def check_names(model_name: str, alias: str) -> None:
    if not model_name or "/" in model_name or ":" in model_name:
        raise UserError(
            f"model_name={model_name!r} is not a valid registered model name; "
            "use letters, digits, '-', '_' or '.' (no '/' or ':')"
        )
    if not _ALIAS.match(alias or "") or alias.lower() == "latest" or re.fullmatch(r"v\d+", alias):
        raise UserError(
            f"alias={alias!r} is not a valid alias; use letters, digits, '-' or '_' "
            "('latest' and 'v<number>' are reserved), e.g. alias=champion"
        )


def _experiments(client: Any) -> str:
    return ", ".join(sorted(e.name for e in client.search_experiments())) or "none"


def finished_runs(client: Any, experiment: str | None, sweep: str | None = None) -> list:
    """All FINISHED runs of ``experiment`` (only the children of run ``sweep`` when given)."""
    if not experiment:
        raise UserError(
            f"say which experiment's runs compete: experiment=<name> (known: {_experiments(client)})"
        )
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(
            f"experiment {experiment!r} not found in the tracking store; "
            f"known: {_experiments(client)} (set experiment=... or tracking.uri=...)"
        )
    query = "attributes.status = 'FINISHED'"
    if sweep:
        from mlflow.exceptions import MlflowException

        try:
            parent = client.get_run(sweep)
        except MlflowException:
            raise UserError(
                f"sweep={sweep!r} is not a run id in this tracking store; "
                "pass the sweep's parent run id (see the MLflow UI)"
            ) from None
        if parent.info.experiment_id != exp.experiment_id:
            other = client.get_experiment(parent.info.experiment_id).name
            raise UserError(
                f"sweep run {sweep} belongs to experiment {other!r}, not {experiment!r}; "
                f"set experiment={other}"
            )
        query += f" and tags.mlflow.parentRunId = '{sweep}'"
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp.experiment_id], filter_string=query, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    if sweep and not runs:
        raise UserError(
            f"sweep {sweep} has no FINISHED trial runs; pass the parent run id of a sweep "
            "(its trials are nested under it) or drop sweep="
        )
    return runs


def given_run(client: Any, run_id: str) -> tuple[Any, str]:
    """The run ``run_id`` (a training or an ensemble run) and its experiment's name; it must have FINISHED."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(
            f"run={run_id!r} is not a run id in this tracking store (check it, or tracking.uri)"
        ) from None
    if run.info.status != "FINISHED":
        raise UserError(f"run {run_id} is {run.info.status}, not FINISHED: promote a run that finished")
    return run, client.get_experiment(run.info.experiment_id).name


def best_run(runs: list, metric: str, where: str) -> Any:
    """The run with the best ``metric`` among those that logged a model (ties: the earlier run)."""
    if not runs:
        raise UserError(f"{where} has no FINISHED runs; train one first (python -m bloodcell.train ...)")
    scored = [r for r in runs if math.isfinite(r.data.metrics.get(metric, math.nan))]
    if not scored:
        known = sorted(
            {m for r in runs for m in r.data.metrics if not m.startswith(("per_class/", "time/", "system/"))}
        )
        raise UserError(f"no FINISHED run of {where} has metric {metric!r}; use one of: {', '.join(known)}")
    with_model = [r for r in scored if r.data.tags.get("model_uri")]
    if not with_model:
        raise UserError(
            f"no FINISHED run of {where} with {metric!r} logged a model "
            "(trained with tracking.log_model=false?); train with tracking.log_model=true"
        )
    sign = 1 if higher_is_better(metric) else -1
    return max(with_model, key=lambda r: (sign * r.data.metrics[metric], -r.info.start_time))


def existing_version(client: Any, model_name: str, run_id: str) -> Any:
    """The version already registered from this run, if any (so promoting twice makes no second one)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    except MlflowException:  # registered model does not exist yet
        return None
    return min(versions, key=lambda v: int(v.version)) if versions else None


def alias_holder(client: Any, model_name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def version_metric(client: Any, version: Any, metric: str) -> float | None:
    """The holder's value of ``metric``: from its source run, else from the tag promote stored."""
    from mlflow.exceptions import MlflowException

    if version.run_id:
        try:
            value = client.get_run(version.run_id).data.metrics.get(metric)
            if value is not None:
                return value
        except MlflowException:  # run deleted since
            pass
    tag = version.tags.get(f"metric.{metric}")
    return float(tag) if tag is not None else None


def _run_config(run: Any) -> str:
    import os

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small text file
    try:
        return mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    except Exception:  # older run or artifact store gone: the version still registers
        return ""


def version_record(run: Any, experiment: str, metric: str) -> tuple[dict[str, str], str]:
    """Tags and description of the model version made from ``run``."""
    metrics = run.data.metrics
    headline_metrics = {
        metric,
        "test_accuracy",
        "test_macro_f1",
        *(k for k in metrics if k.startswith("best_")),
    }
    tags = {
        "run_id": run.info.run_id,
        "experiment": experiment,
        "ranked_by": metric,
        **{f"metric.{k}": repr(v) for k, v in sorted(metrics.items()) if k in headline_metrics},
        **{k: run.data.tags[k] for k in PROVENANCE_TAGS if k in run.data.tags},
    }
    config = _run_config(run)
    if config:
        tags["config"] = config
    headline = ", ".join(f"{k}={metrics[k]:.4f}" for k in sorted(headline_metrics) if k in metrics)
    description = (
        f"Run {run.info.run_id} of experiment '{experiment}' ({headline}).\n"
        f"Data fingerprint {run.data.tags.get('data_fingerprint', 'unknown')}, "
        f"git commit {run.data.tags.get('git_commit', 'unknown')}.\n"
    )
    if config:
        description += f"\nResolved config:\n\n```yaml\n{config.rstrip()}\n```\n"
    return tags, description


def register(client: Any, model_name: str, run: Any, experiment: str, metric: str) -> tuple[Any, bool]:
    """A new version of ``model_name`` from the run's logged model; returns (version, created)."""
    from mlflow.exceptions import MlflowException

    found = existing_version(client, model_name, run.info.run_id)
    if found is not None:
        return found, False
    try:
        client.create_registered_model(
            model_name,
            description="Blood-cell classifiers (bloodcell): 96x96 RGB -> 8 classes, "
            "input float32 pixels 0-255, output softmax.",
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_uri = run.data.tags["model_uri"]  # models:/<logged model id>
    tags, description = version_record(run, experiment, metric)
    version = client.create_model_version(
        model_name,
        source=model_uri,
        run_id=run.info.run_id,
        tags=tags,
        description=description,
        model_id=model_uri.split("/", 1)[1],
    )
    return version, True


@dataclass
class Decision:
    """Whether the alias moves, why, what the gate printed and what it writes on the model version."""

    moved: bool
    reason: str
    details: str = ""
    tags: dict[str, str] = field(default_factory=dict)


def holder_provenance(client: Any, version: Any) -> str:
    """'holder version 3 (experiment 'x', data <source>, fingerprint <12 hex>)': where the model holding
    the alias came from, so that a refusal says what the challenger was measured against."""
    tags = dict(version.tags or {})
    if version.run_id and not all(k in tags for k in ("experiment", "data_source")):
        run = _run_or_none(client, version.run_id)
        if run is not None:
            tags = {**run.data.tags, **tags}
            tags.setdefault("experiment", client.get_experiment(run.info.experiment_id).name)
    fingerprint = tags.get("data_fingerprint_cleaned") or tags.get("data_fingerprint") or "?"
    return (
        f"holder version {version.version} (experiment '{tags.get('experiment', '?')}', "
        f"data {tags.get('data_source', '?')}, fingerprint {fingerprint[:12]})"
    )


def _run_or_none(client: Any, run_id: str | None) -> Any:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def metric_gate(client: Any, value: float, holder: Any, metric: str, who: str) -> Decision:
    """The old rule: the challenger's ``metric`` beats the holder's, by any margin."""
    held = version_metric(client, holder, metric)
    if held is None:
        return Decision(False, f"{who} has no {metric} to compare; use force=true to move the alias anyway")
    if _beats(value, held, metric):
        return Decision(
            True, f"{metric} {value:.4f} beats holder version {holder.version} ({held:.4f}); {who}"
        )
    return Decision(
        False,
        f"{metric} {value:.4f} does not beat holder version {holder.version} ({held:.4f}); {who}; "
        "use force=true to move the alias anyway",
    )


class _CannotTake(Exception):
    """The model cannot take the evaluation images (trained on another image size)."""


def _predict(model_uri: str, images: Any, who: str) -> Any:
    from bloodcell.compare import predict_on

    try:
        return predict_on(model_uri, images, who).argmax(axis=1)
    except UserError as err:
        raise _CannotTake(str(err)) from None


def _shape(model_uri: str) -> tuple | None:
    """(H, W, C) from an MLflow model's signature, read without loading TensorFlow; None when unknown."""
    try:
        import mlflow

        inputs = mlflow.models.get_model_info(model_uri).signature.inputs.inputs
        return tuple(None if d == -1 else d for d in inputs[0].shape[1:])
    except Exception:  # no signature or another layout: loading the model tells
        return None


def _size(shape: tuple) -> str:
    return f"{shape[0]}x{shape[1]}"


def statistical_gate(
    client: Any,
    run: Any,
    version: Any,
    holder: Any,
    *,
    alpha: float,
    max_class_drop: float,
    eval_path: str | None = None,
) -> Decision:
    """McNemar's exact test of the challenger (``run``, registered as ``version``) against the ``holder``
    version on the same images, and every class's recall: see the module doc."""
    from bloodcell import compare

    who = holder_provenance(client, holder)
    holder_run = _run_or_none(client, holder.run_id)
    base = {"gate.holder_version": str(holder.version), "gate.holder_run_id": str(holder.run_id or "")}
    if eval_path:
        images, labels = compare.labelled_images(eval_path)
        try:
            challenger_pred = _predict(version.source, images, "the challenger")
        except _CannotTake as err:
            raise UserError(f"the challenger cannot take eval={eval_path}: {err}") from None
        where = f"eval={eval_path} ({len(labels)} images)"
        try:
            holder_pred = _predict(holder.source, images, who)
        except _CannotTake as err:
            return Decision(True, f"{err}: it loses", tags=base)
    else:
        mine, theirs = _shape(version.source), _shape(holder.source)
        if mine and theirs and tuple(mine[:2]) != tuple(theirs[:2]):
            return Decision(
                True,
                f"{who} takes {_size(theirs)} images and cannot take the challenger's {_size(mine)} test "
                "images: it loses",
                tags=base,
            )
        challenger_stored = compare.stored_predictions(client, run.info.run_id, "test")
        if challenger_stored is None:
            return Decision(
                False,
                f"run {run.info.run_id} kept no test predictions (trained before runs kept them): "
                "judge it on eval=<labelled npz>, or use gate=metric",
                tags=base,
            )
        mine_fp = run.data.tags.get("data_fingerprint_cleaned") or run.data.tags.get("data_fingerprint")
        holder_tags = {**(holder_run.data.tags if holder_run else {}), **(holder.tags or {})}
        theirs_fp = holder_tags.get("data_fingerprint_cleaned") or holder_tags.get("data_fingerprint")
        if mine_fp and mine_fp == theirs_fp:
            holder_stored = (
                compare.stored_predictions(client, holder.run_id, "test") if holder.run_id else None
            )
            if holder_stored is None:
                return Decision(
                    False,
                    f"{who} has no stored test predictions to compare with: judge both on "
                    "eval=<labelled npz>, or use gate=metric",
                    tags=base,
                )
            common, (mine_rows, theirs_rows) = compare.shared_images([challenger_stored, holder_stored])
            if len(common) == 0:
                return Decision(
                    False,
                    f"{who} and the challenger were split differently and their test splits share no "
                    "image: judge both on eval=<labelled npz>, or use gate=metric",
                    tags=base,
                )
            labels = challenger_stored.labels[mine_rows]
            challenger_pred = challenger_stored.predicted[mine_rows]
            holder_pred = holder_stored.predicted[theirs_rows]
            same_split = run.data.tags.get("split_fingerprint") == holder_tags.get("split_fingerprint")
            where = (
                f"their shared test split ({len(common)} images)"
                if same_split
                else f"the {len(common)} test images both runs held out (same data, other splits)"
            )
        else:
            try:
                images = compare.split_images(run, "test", challenger_stored.data_index)
            except (UserError, OSError, KeyError) as err:
                return Decision(
                    False,
                    f"{who} was trained on other data than the challenger, and the challenger's test images "
                    f"cannot be loaded again to show it them ({err}): judge both on eval=<labelled npz>",
                    tags=base,
                )
            labels = challenger_stored.labels
            challenger_pred = challenger_stored.predicted
            try:
                holder_pred = _predict(holder.source, images, who)
            except _CannotTake as err:
                return Decision(True, f"{err} (the challenger's test images): it loses", tags=base)
            where = (
                f"the challenger's test split ({len(labels)} images; the holder was trained on other data "
                "and may have seen some of them, which can only favour it)"
            )
    pair = compare.compare_pair(labels, holder_pred, challenger_pred, "holder", "challenger")
    return _judge(pair, where, who, alpha, max_class_drop, base)


def _judge(
    pair: Any, where: str, who: str, alpha: float, max_class_drop: float, tags: dict[str, str]
) -> Decision:
    """The decision on a paired comparison: better by McNemar at ``alpha``, and no class's recall down by
    more than ``max_class_drop`` (every class counts alike, however rare)."""
    from bloodcell import CLASS_NAMES

    test = pair.test
    better = test.p_value < alpha and test.only_b > test.only_a
    drops = [
        (name, c.delta)
        for name, c in zip(CLASS_NAMES, pair.classes)
        if c.images and c.delta < -max_class_drop - 1e-12
    ]
    evidence = (
        f"McNemar p={test.p_value:.3g} on {where}: {test.only_b} images only the challenger gets right, "
        f"{test.only_a} only the holder"
    )
    if better and not drops:
        moved, reason = (
            True,
            (
                f"better than {who} at alpha {alpha} ({evidence}), and no class's recall falls by more than "
                f"{100 * max_class_drop:g} points"
            ),
        )
    elif better:
        listed = ", ".join(f"{name} {100 * delta:+.1f}" for name, delta in drops)
        moved, reason = (
            False,
            (
                f"better overall than {who} ({evidence}), but recall falls by more than "
                f"{100 * max_class_drop:g} points on {listed}; use force=true to move the alias anyway"
            ),
        )
    else:
        moved, reason = (
            False,
            (f"not better than {who} at alpha {alpha} ({evidence}); use force=true to move the alias anyway"),
        )
    details = _pair_text(pair)
    tags = {
        **tags,
        "gate.evaluated_on": where[:5000],
        "gate.images": str(int(test.table.sum())),
        "gate.table": json.dumps(
            {
                "both_right": int(test.table[0, 0]),
                "only_holder_right": test.only_a,
                "only_challenger_right": test.only_b,
                "both_wrong": int(test.table[1, 1]),
            }
        ),  # fmt: skip
        "gate.p_value": repr(test.p_value),
        "gate.class_recall_deltas": json.dumps(
            {name: round(c.delta, 6) for name, c in zip(CLASS_NAMES, pair.classes) if c.images}
        ),
    }
    return Decision(moved, reason, details, tags)


def _pair_text(pair: Any) -> str:
    from bloodcell.compare import pair_text

    return pair_text(pair)


def record_decision(
    client: Any, model_name: str, version: Any, alias: str, gate: str, decision: Decision, settings: dict
) -> None:
    """The decision as ``gate.*`` tags of the challenger's version: the registry alone says why the alias
    moved or did not."""
    tags = {
        "gate": gate,
        "gate.alias": alias,
        "gate.decision": "moved" if decision.moved else "kept",
        "gate.reason": decision.reason[:5000],
        "gate.decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **{f"gate.{k}": str(v) for k, v in settings.items()},
        **decision.tags,
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version.version), key, value)


def run_model_name(run: Any) -> str:
    """The registered model a run was trained for (its config's ``model_name``; ``bloodcell-demo`` for the
    synthetic-data demo preset), so that a demo model never holds the real model's alias."""
    return str(run.data.params.get("model_name") or DEFAULT_MODEL_NAME)


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


def main_task(cfg: DictConfig) -> Promotion:
    from bloodcell.tracking import connect

    check_names(cfg.model_name or DEFAULT_MODEL_NAME, cfg.alias)
    uri = connect(cfg.tracking)
    import mlflow

    client = mlflow.MlflowClient(uri)
    gate = cfg.gate
    result = promote(
        client,
        experiment=cfg.tracking.experiment,
        metric=cfg.metric,
        model_name=cfg.model_name,
        alias=cfg.alias,
        sweep=cfg.sweep,
        run_id=cfg.get("run"),
        force=bool(cfg.force),
        gate=str(gate.name),
        alpha=float(gate.get("alpha", 0.05)),
        max_class_drop=float(gate.get("max_class_drop", 0.02)),
        eval_path=cfg.get("eval"),
    )
    label = f"{result.model_name}@{cfg.alias}"
    verb = "registered as" if result.created else "is already"
    print(
        f"best run {result.run_id}: {cfg.metric}={result.value:.4f}, {verb} version {result.version} "
        f"of '{result.model_name}'"
    )
    if result.details:
        print(result.details)
    if result.alias_moved:
        print(f"{label} -> version {result.version}: {result.reason}")
    else:
        print(f"{label} unchanged: {result.reason}")
    return result


def expand_experiment_shorthand(argv: list[str]) -> list[str]:
    """``experiment=<name>`` -> ``tracking.experiment=<name>``. Hydra would read the bare key as a choice
    of the config group conf/experiment/ (train's ``+experiment=...`` overlays) and refuse it."""
    return [f"tracking.{arg}" if arg.startswith("experiment=") else arg for arg in argv]


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="promote")
def main(cfg: DictConfig) -> None:
    run_or_exit(main_task, cfg)


if __name__ == "__main__":
    sys.argv = expand_experiment_shorthand(sys.argv)
    main()
