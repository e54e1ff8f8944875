"""The MLflow model registry as promote uses it: which runs may be promoted and which is best, registering a
run's logged model (once per run) with its provenance, and who holds an alias.
"""

from __future__ import annotations

import math
import re
from typing import Any

from bloodcell.core.errors import UserError

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


def run_model_name(run: Any) -> str:
    """The registered model a run was trained for (its config's ``model_name``; ``bloodcell-demo`` for the
    synthetic-data demo preset), so that a demo model never holds the real model's alias."""
    return str(run.data.params.get("model_name") or DEFAULT_MODEL_NAME)
