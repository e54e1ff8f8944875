"""Whether a challenger takes the alias from its holder: ``gate=metric`` (a higher metric) or
``gate=mcnemar`` (McNemar's exact test on the same images, and no class's recall falling by more than
``max_class_drop``); every decision is written on the challenger's model version as ``gate.*`` tags.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from bloodcell.core.errors import UserError
from bloodcell.serving.registry import _beats, version_metric

GATES = ("mcnemar", "metric")


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
    from bloodcell.serving.prediction import predict_on

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
    from bloodcell.evaluation.comparison import compare_pair
    from bloodcell.evaluation.stored_predictions import shared_images, stored_predictions
    from bloodcell.training.run_data import labelled_images, split_images

    who = holder_provenance(client, holder)
    holder_run = _run_or_none(client, holder.run_id)
    base = {"gate.holder_version": str(holder.version), "gate.holder_run_id": str(holder.run_id or "")}
    if eval_path:
        images, labels = labelled_images(eval_path)
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
        challenger_stored = stored_predictions(client, run.info.run_id, "test")
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
            holder_stored = stored_predictions(client, holder.run_id, "test") if holder.run_id else None
            if holder_stored is None:
                return Decision(
                    False,
                    f"{who} has no stored test predictions to compare with: judge both on "
                    "eval=<labelled npz>, or use gate=metric",
                    tags=base,
                )
            common, (mine_rows, theirs_rows) = shared_images([challenger_stored, holder_stored])
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
                images = split_images(run, "test", challenger_stored.data_index)
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
    pair = compare_pair(labels, holder_pred, challenger_pred, "holder", "challenger")
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
    from bloodcell.evaluation.comparison import pair_text

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
