"""Whether a challenger takes the alias from its holder: ``gate=metric`` (a higher metric) or
``gate=mcnemar`` (McNemar's exact test on the same images, and no class's recall falling by more than
``max_class_drop``); every decision is written on the challenger's model version as ``gate.*`` tags.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bloodcell.core.errors import UserError
from bloodcell.serving.registry import _beats, version_metric

if TYPE_CHECKING:
    from bloodcell.serving.settings import PromoteSettings


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


def metric_gate(client: Any, run: Any, version: Any, holder: Any, settings: PromoteSettings) -> Decision:
    """The old rule: the challenger's (``run``'s) ``metric`` beats the holder's, by any margin."""
    metric, who = settings.metric, holder_provenance(client, holder)
    value = run.data.metrics[metric]
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


@dataclass
class _Paired:
    """Both models' predicted classes on the same images, the images' true classes, and which images."""

    labels: Any
    holder: Any
    challenger: Any
    where: str


class _Settled(Exception):
    """The gate is decided before any test: the holder cannot take the images (it loses), or there are no
    images both can be judged on (the alias stays)."""

    def __init__(self, moved: bool, reason: str) -> None:
        super().__init__(reason)
        self.moved, self.reason = moved, reason


def statistical_gate(client: Any, run: Any, version: Any, holder: Any, settings: PromoteSettings) -> Decision:
    """McNemar's exact test of the challenger (``run``, registered as ``version``) against the ``holder``
    version on the same images, and every class's recall (see the module doc), in three steps: which images
    and both models' predictions on them (``eval=`` images, or test images), then the judgement."""
    from bloodcell.evaluation.comparison import compare_pair

    who = holder_provenance(client, holder)
    tags = {"gate.holder_version": str(holder.version), "gate.holder_run_id": str(holder.run_id or "")}
    try:
        if settings.eval:
            paired = _on_eval_images(settings.eval, version, holder, who)
        else:
            paired = _on_test_images(client, run, version, holder, who)
    except _Settled as settled:
        return Decision(settled.moved, settled.reason, tags=tags)
    pair = compare_pair(paired.labels, paired.holder, paired.challenger, "holder", "challenger")
    alpha, max_class_drop = settings.gate.alpha, settings.gate.max_class_drop
    assert alpha is not None and max_class_drop is not None  # the mcnemar gate's settings have both
    return _judge(pair, paired.where, who, alpha, max_class_drop, tags)


def _on_eval_images(eval_path: str, version: Any, holder: Any, who: str) -> _Paired:
    """Both models predict the labelled ``eval=`` images."""
    from bloodcell.training.run_data import labelled_images

    images, labels = labelled_images(eval_path)
    try:
        challenger = _predict(version.source, images, "the challenger")
    except _CannotTake as err:
        raise UserError(f"the challenger cannot take eval={eval_path}: {err}") from None
    try:
        held = _predict(holder.source, images, who)
    except _CannotTake as err:
        raise _Settled(True, f"{err}: it loses") from None
    return _Paired(labels, held, challenger, f"eval={eval_path} ({len(labels)} images)")


def _fingerprint(tags: dict) -> str | None:
    return tags.get("data_fingerprint_cleaned") or tags.get("data_fingerprint")


def _on_test_images(client: Any, run: Any, version: Any, holder: Any, who: str) -> _Paired:
    """Test images: those both runs held out when they were trained on the same data (their stored
    predictions), else the challenger's test split, loaded again and shown to the holder."""
    from bloodcell.evaluation.stored_predictions import stored_predictions

    mine, theirs = _shape(version.source), _shape(holder.source)
    if mine and theirs and tuple(mine[:2]) != tuple(theirs[:2]):
        raise _Settled(
            True,
            f"{who} takes {_size(theirs)} images and cannot take the challenger's {_size(mine)} test "
            "images: it loses",
        )
    challenger = stored_predictions(client, run.info.run_id, "test")
    if challenger is None:
        raise _Settled(
            False,
            f"run {run.info.run_id} kept no test predictions (trained before runs kept them): "
            "judge it on eval=<labelled npz>, or use gate=metric",
        )
    holder_run = _run_or_none(client, holder.run_id)
    holder_tags = {**(holder_run.data.tags if holder_run else {}), **(holder.tags or {})}
    mine_fp = _fingerprint(run.data.tags)
    if mine_fp and mine_fp == _fingerprint(holder_tags):
        return _on_shared_test_images(client, run, challenger, holder, holder_tags, who)
    return _on_challenger_test_images(run, challenger, holder, who)


def _on_shared_test_images(
    client: Any, run: Any, challenger: Any, holder: Any, holder_tags: dict, who: str
) -> _Paired:
    """Same data: the stored test predictions of both runs, on the images both held out."""
    from bloodcell.evaluation.stored_predictions import shared_images, stored_predictions

    held = stored_predictions(client, holder.run_id, "test") if holder.run_id else None
    if held is None:
        raise _Settled(
            False,
            f"{who} has no stored test predictions to compare with: judge both on "
            "eval=<labelled npz>, or use gate=metric",
        )
    common, (mine_rows, theirs_rows) = shared_images([challenger, held])
    if len(common) == 0:
        raise _Settled(
            False,
            f"{who} and the challenger were split differently and their test splits share no "
            "image: judge both on eval=<labelled npz>, or use gate=metric",
        )
    same_split = run.data.tags.get("split_fingerprint") == holder_tags.get("split_fingerprint")
    where = (
        f"their shared test split ({len(common)} images)"
        if same_split
        else f"the {len(common)} test images both runs held out (same data, other splits)"
    )
    return _Paired(
        challenger.labels[mine_rows], held.predicted[theirs_rows], challenger.predicted[mine_rows], where
    )


def _on_challenger_test_images(run: Any, challenger: Any, holder: Any, who: str) -> _Paired:
    """Other data: the challenger's test images, loaded again, predicted by the holder."""
    from bloodcell.training.run_data import split_images

    try:
        images = split_images(run, "test", challenger.data_index)
    except (UserError, OSError, KeyError) as err:
        raise _Settled(
            False,
            f"{who} was trained on other data than the challenger, and the challenger's test images "
            f"cannot be loaded again to show it them ({err}): judge both on eval=<labelled npz>",
        ) from None
    try:
        held = _predict(holder.source, images, who)
    except _CannotTake as err:
        raise _Settled(True, f"{err} (the challenger's test images): it loses") from None
    where = (
        f"the challenger's test split ({len(challenger.labels)} images; the holder was trained on other "
        "data and may have seen some of them, which can only favour it)"
    )
    return _Paired(challenger.labels, held, challenger.predicted, where)


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


#: ``gate=<name>``: the gate a challenger that is not already the holder has to pass (conf/gate/<name>.yaml)
GATES = {"mcnemar": statistical_gate, "metric": metric_gate}
