"""`python -m bloodcell.promote`: the best finished run -> a registered model version -> maybe the alias.

    python -m bloodcell.promote experiment=effnetb2                       # best of all runs
    python -m bloodcell.promote experiment=effnetb2 sweep=<parent run id> # best trial of one sweep
    python -m bloodcell.promote experiment=effnetb2 force=true            # move the alias regardless

Steps: rank the experiment's FINISHED runs that logged a model by ``metric`` -> register the winner's
logged model as a new version of ``model_name`` (or reuse the version already made from that run) ->
move ``alias`` to it only when it beats the version holding the alias on the same metric (or ``force``).
Everything the user can get wrong is checked before the registry is touched.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass

import hydra
from omegaconf import DictConfig

from bloodcell import PROJECT_ROOT
from bloodcell.cli import run_or_exit
from bloodcell.errors import UserError

#: Run tags copied onto the model version, so the registry alone says where a model came from.
PROVENANCE_TAGS = (
    "data_fingerprint",
    "data_source",
    "git_commit",
    "git_dirty",
    "bloodcell_version",
    "model_uri",
    "trial_number",
)
_ALIAS = re.compile(r"^[\w\-]{1,255}$")


@dataclass
class Promotion:
    """What promote did: the version it registered (or found) and whether the alias moved, and why."""

    run_id: str
    version: str
    created: bool
    alias_moved: bool
    reason: str
    value: float


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


def _experiments(client) -> str:
    return ", ".join(sorted(e.name for e in client.search_experiments())) or "none"


def finished_runs(client, experiment: str | None, sweep: str | None = None) -> list:
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


def best_run(runs: list, metric: str, where: str):
    """The run with the best ``metric`` among those that logged a model (ties: the earlier run)."""
    if not runs:
        raise UserError(f"{where} has no FINISHED runs; train one first (python -m bloodcell.train ...)")
    scored = [r for r in runs if math.isfinite(r.data.metrics.get(metric, math.nan))]
    if not scored:
        known = sorted(
            {m for r in runs for m in r.data.metrics if not m.startswith(("test_precision_", "test_recall_"))}
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


def existing_version(client, model_name: str, run_id: str):
    """The version already registered from this run, if any (so promoting twice makes no second one)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    except MlflowException:  # registered model does not exist yet
        return None
    return min(versions, key=lambda v: int(v.version)) if versions else None


def alias_holder(client, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def version_metric(client, version, metric: str) -> float | None:
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


def _run_config(run) -> str:
    import os

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small text file
    try:
        return mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    except Exception:  # older run or artifact store gone: the version still registers
        return ""


def version_record(run, experiment: str, metric: str) -> tuple[dict[str, str], str]:
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


def register(client, model_name: str, run, experiment: str, metric: str):
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


def promote(
    client,
    *,
    experiment: str | None,
    metric: str = "best_val_accuracy",
    model_name: str = "bloodcell",
    alias: str = "champion",
    sweep: str | None = None,
    force: bool = False,
) -> Promotion:
    check_names(model_name, alias)
    where = f"sweep {sweep} in experiment {experiment!r}" if sweep else f"experiment {experiment!r}"
    run = best_run(finished_runs(client, experiment, sweep), metric, where)
    value = run.data.metrics[metric]
    version, created = register(client, model_name, run, experiment, metric)
    holder = alias_holder(client, model_name, alias)
    label = f"{model_name}@{alias}"
    if holder is not None and str(holder.version) == str(version.version):
        moved, reason = False, f"version {version.version} already holds {label}"
    elif holder is None:
        moved, reason = True, f"{label} was unset"
    else:
        held = version_metric(client, holder, metric)
        if force:
            moved, reason = True, f"force=true (holder version {holder.version} has {metric}={held})"
        elif held is None:
            moved, reason = (
                False,
                (
                    f"holder version {holder.version} has no {metric} to compare; "
                    "use force=true to move the alias anyway"
                ),
            )
        elif _beats(value, held, metric):
            moved, reason = True, (f"{metric} {value:.4f} beats holder version {holder.version} ({held:.4f})")
        else:
            moved, reason = (
                False,
                (
                    f"{metric} {value:.4f} does not beat holder version {holder.version} "
                    f"({held:.4f}); use force=true to move the alias anyway"
                ),
            )
    if moved:
        client.set_registered_model_alias(model_name, alias, version.version)
    return Promotion(run.info.run_id, str(version.version), created, moved, reason, value)


def main_task(cfg: DictConfig) -> Promotion:
    from bloodcell.tracking import connect

    check_names(cfg.model_name, cfg.alias)
    uri = connect(cfg.tracking)
    import mlflow

    client = mlflow.MlflowClient(uri)
    result = promote(
        client,
        experiment=cfg.tracking.experiment,
        metric=cfg.metric,
        model_name=cfg.model_name,
        alias=cfg.alias,
        sweep=cfg.sweep,
        force=bool(cfg.force),
    )
    label = f"{cfg.model_name}@{cfg.alias}"
    verb = "registered as" if result.created else "is already"
    print(
        f"best run {result.run_id}: {cfg.metric}={result.value:.4f}, {verb} version {result.version} "
        f"of '{cfg.model_name}'"
    )
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
