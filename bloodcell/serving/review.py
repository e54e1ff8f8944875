"""The review threshold a model carries: ``predict review_accuracy=0.99`` reads, from the run that logged
the model, the threshold that run certified on its validation split for that accuracy among kept cells
(`bloodcell.evaluation.abstention.guaranteed_threshold`), and says what it promises.

A model is traced to its run through MLflow: a registered version's or a logged model's source run, or the
run of a ``runs:/`` URI. A plain file or folder has no run, so it has no threshold: ``review_below=<p>``
is the way to review with it.
"""

from __future__ import annotations

import math
from typing import Any

from bloodcell.core.errors import UserError
from bloodcell.evaluation.abstention import Guarantee, metric_suffix


def source_run_id(uri: str, client: Any) -> str | None:
    """The run that logged the model at ``uri`` (as `resolve_model_uri` returns it): None for a file or an
    MLflow model folder."""
    if uri.startswith("runs:/"):
        return uri[len("runs:/") :].split("/", 1)[0]
    if not uri.startswith("models:/"):
        return None
    ref = uri[len("models:/") :].strip("/")
    if ref.startswith("m-") and "/" not in ref and "@" not in ref:
        return str(client.get_logged_model(ref).source_run_id)
    name, at, alias = ref.partition("@")
    if at:
        return str(client.get_model_version_by_alias(name, alias).run_id)
    name, _, version = name.partition("/")
    if not version or version == "latest":
        versions = client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"])
        return str(versions[0].run_id) if versions else None
    return str(client.get_model_version(name, version).run_id)


def stored_guarantee(uri: str, target: float, client: Any) -> tuple[Guarantee, str]:
    """The guaranteed review threshold for ``target`` that the run of the model ``uri`` logged, and that
    run's id. One UserError line when the model has none: no run behind it, a run from before guaranteed
    thresholds (its ``threshold_at`` metric is a point estimate read off its test split), another target,
    or a target no threshold could certify on its validation split."""
    run_id = source_run_id(uri, client)
    if run_id is None:
        raise UserError(
            f"model {uri} is a file, not a model logged by a run, so it carries no review threshold: "
            "use a models:/ or runs:/ URI, or review_below=<top probability>"
        )
    metrics = client.get_run(run_id).data.metrics
    if "abstention/confidence" not in metrics:
        raise UserError(
            f"the run {run_id} behind model {uri} has no guaranteed review threshold (it was trained before "
            "they were logged): retrain it, or use review_below=<top probability>"
        )
    name = f"abstention/threshold_at_{metric_suffix(target)}_accuracy"
    if name not in metrics:
        known = sorted(
            float(key.split("_at_")[1].removesuffix("_accuracy")) / 100
            for key in metrics
            if key.startswith("abstention/threshold_at_")
        )
        raise UserError(
            f"the run {run_id} behind model {uri} has review thresholds for "
            f"{', '.join(f'{t:g}' for t in known) or 'no accuracy'}, not {target:g}: use one of them, or "
            f"train with trainer.abstention.targets=[...,{target:g}]"
        )
    guarantee = Guarantee(
        target=target,
        confidence=float(metrics["abstention/confidence"]),
        threshold=float(metrics[name]),
        calibration_images=int(metrics.get("abstention/calibration_images", 0)),
        calibration_coverage=float(
            metrics.get(f"abstention/calibration_coverage_at_{metric_suffix(target)}_accuracy", math.nan)
        ),
        batch_cells=int(metrics.get("abstention/batch_cells", 0)) or None,
    )
    if not guarantee.found:
        raise UserError(
            f"the run {run_id} behind model {uri} found no threshold that keeps "
            f"{guarantee.promise().removeprefix('kept cells ')} on its {guarantee.calibration_images} "
            "validation cells: use a lower review_accuracy, or review_below=<top probability>"
        )
    return guarantee, run_id
