"""Several trained runs as one model: which members (`check_members`, top-k or greedy selection on their
stored validation predictions), the averaging Keras model (`build_ensemble`), its evaluation on the members'
shared splits, and its MLflow run with a training run's records (`record_ensemble`); `make_ensemble` does it
all from the composed config, for the command (`bloodcell/ensemble.py`) and `bloodcell.api.ensemble`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from bloodcell.core.errors import UserError
from bloodcell.evaluation.candidates import Candidate

if TYPE_CHECKING:
    import keras

    from bloodcell.training.run_data import RunData
log = logging.getLogger("bloodcell.ensemble")


SELECTIONS = ("topk", "greedy")


#: tag of an ensemble run: `compare sweep=` and a later `ensemble sweep=` leave it out of the sweep's trials
ENSEMBLE_TAG = "bloodcell.ensemble"


#: run tags copied from the members: which data and split the ensemble was evaluated on
DATA_TAGS = ("data_fingerprint", "data_fingerprint_cleaned", "data_source", "split_fingerprint")


def check_members(models: list[Candidate]) -> None:
    """Members that can be averaged and evaluated together: each logged a model, all trained on the same
    data and split (else their test splits differ and one may have trained on another's test images)."""
    first = models[0]
    for m in models:
        if not m.tags.get("model_uri"):
            raise UserError(
                f"run {m.run_id} logged no model (trained with tracking.log_model=false?); ensemble runs "
                "that logged one, or train it again with tracking.log_model=true"
            )
    for m in models[1:]:
        if m.data_fingerprint != first.data_fingerprint:
            raise UserError(
                f"runs {first.run_id[:8]} and {m.run_id[:8]} were trained on different data "
                f"({first.tags.get('data_source', '?')}, fingerprint {first.data_fingerprint[:12] or '?'} vs "
                f"{m.tags.get('data_source', '?')}, fingerprint {m.data_fingerprint[:12] or '?'}): an "
                "ensemble's members must share one test split; ensemble runs of one data set"
            )
        if m.split_fingerprint != first.split_fingerprint:
            seeds = f"split seed {first.split_seed} vs {m.split_seed}"
            raise UserError(
                f"runs {first.run_id[:8]} and {m.run_id[:8]} were trained on the same data but split "
                f"differently ({seeds}, or other fractions or folds): an ensemble's members must share one "
                "validation and test split; ensemble runs of one split"
            )


def greedy_selection(probabilities: list[np.ndarray], labels: np.ndarray, size: int) -> list[int]:
    """Ensemble selection with replacement (Caruana et al. 2004, "Ensemble selection from libraries of
    models"): start empty, add the candidate whose addition gives the average the best validation accuracy
    (ties: the lower log loss, then the earlier candidate), ``size`` times; return how often each candidate
    was picked in the best of those ``size`` ensembles (the earliest, when several score alike).

    Picking with replacement weights a good member more than once and lets the score plateau instead of
    falling as weaker candidates join, which is what makes the method safe on a small validation split."""
    from sklearn.metrics import log_loss

    if size < 1:
        raise UserError(f"size={size} must be >= 1 (how many picks greedy selection makes)")
    classes = list(range(probabilities[0].shape[1]))

    def score(average: np.ndarray) -> tuple[float, float]:
        accuracy = float(np.mean(average.argmax(axis=1) == labels))
        # rounded: the same average summed in another order must score the same
        return accuracy, -round(float(log_loss(labels, average, labels=classes)), 9)

    counts = np.zeros(len(probabilities), dtype=np.int64)
    total = np.zeros_like(probabilities[0], dtype=np.float64)
    best: tuple[tuple[float, float], np.ndarray] | None = None
    for step in range(1, size + 1):
        scores = [score((total + p) / step) for p in probabilities]
        pick = max(range(len(scores)), key=lambda i: scores[i])  # max keeps the first of equals
        counts[pick] += 1
        total += probabilities[pick]
        if best is None or scores[pick] > best[0]:
            best = scores[pick], counts.copy()
    assert best is not None
    return [int(c) for c in best[1]]


def select(
    client: Any, models: list[Candidate], selection: str, size: int
) -> tuple[list[Candidate], list[int]]:
    """The members and their weights: every candidate once (``topk``), or greedy selection on the stored
    validation predictions (``greedy``)."""
    if selection == "topk":
        return models, [1] * len(models)
    from bloodcell.evaluation.stored_predictions import required_predictions, shared_images

    fix = "greedy selection needs them; use selection=topk"
    stored = [required_predictions(client, m.run_id, "val", fix) for m in models]
    _, rows = shared_images(stored)
    labels = stored[0].labels[rows[0]]
    weights = greedy_selection([p.probabilities[r] for p, r in zip(stored, rows)], labels, size)
    chosen = [(m, w) for m, w in zip(models, weights) if w]
    return [m for m, _ in chosen], [w for _, w in chosen]


def build_ensemble(members: list[keras.Model], weights: list[int]) -> keras.Model:
    """One input -> every member -> the average of their probabilities, member ``i`` counted ``weights[i]``
    times. Members keep their own resizing and preprocessing layers, so they only need to take the same raw
    images; each becomes a nested model named ``member_<i>``.

    Standard Keras layers only, so that the ensemble loads without bloodcell (Keras' safe mode, MLflow)
    and its temperature is one more standard layer (`calibration.with_temperature`: Rescaling(1 / T)
    before the last softmax). Keras has no log layer, so the average is taken in log space: each member
    gives log_softmax of its logits (log p_i; its own Dense layer with that activation), plus log w_i
    (Rescaling's offset); log(sum_i w_i p_i) is the log-sum-exp over the members, x - log_softmax(x) along
    the member axis (Permute, Activation('log_softmax'), Subtract; Cropping1D keeps one of its equal
    columns); and softmax of it is the weighted average: softmax(log(sum_i w_i p_i) / T) is temperature
    scaling of the average, T = 1 the plain average."""
    import math

    import keras
    from keras import layers

    from bloodcell import NUM_CLASSES
    from bloodcell.evaluation.calibration import log_probabilities

    shapes = {tuple(m.input_shape[1:]) for m in members}
    if len(shapes) > 1:
        raise UserError(
            f"the members take images of different shapes {sorted(shapes)}: they were trained on other data; "
            "ensemble runs of one data set"
        )
    inputs = keras.Input(shapes.pop(), name="image")
    logs = []
    for i, (member, weight) in enumerate(zip(members, weights)):
        try:
            member = log_probabilities(member)
        except ValueError as err:
            raise UserError(f"member {i} cannot be averaged: {err}") from None
        member.name = f"member_{i}"  # the members' own names collide (bloodcell_<backbone>)
        x = member(inputs)
        if weight != 1:  # log(w_i p_i)
            x = layers.Rescaling(1.0, offset=math.log(weight), name=f"weight_{i}", dtype="float32")(x)
        logs.append(layers.Reshape((1, NUM_CLASSES), name=f"stack_{i}", dtype="float32")(x))
    x = logs[0]
    if len(logs) > 1:
        x = layers.Concatenate(axis=1, name="members", dtype="float32")(logs)  # (N, members, classes)
        by_class = layers.Permute((2, 1), name="by_class", dtype="float32")(x)  # (N, classes, members)
        shifted = layers.Activation("log_softmax", name="minus_logsumexp", dtype="float32")(by_class)
        x = layers.Subtract(name="logsumexp", dtype="float32")([by_class, shifted])  # equal columns
        x = layers.Permute((2, 1), name="by_member", dtype="float32")(x)
        x = layers.Cropping1D((0, len(logs) - 1), name="one_column", dtype="float32")(x)
    x = layers.Reshape((NUM_CLASSES,), name="log_sum", dtype="float32")(x)  # log(sum_i w_i p_i)
    averaged = layers.Activation("softmax", name="average", dtype="float32")(x)
    return keras.Model(inputs, averaged, name="bloodcell_ensemble")


@dataclass
class Ensemble:
    """What `ensemble` made: its members and weights, the model it logs, and that model on the splits."""

    members: list[Candidate]
    weights: list[int]
    model: keras.Model
    data: RunData
    result: Any  # bloodcell.train.TestResult
    run_id: str = ""
    #: the config its run records (`ensemble_config`)
    config: DictConfig | None = None


def evaluate(cfg: DictConfig, model: keras.Model, data: RunData) -> Any:
    """The ensemble (with its temperature when ``calibrate``) on the validation and test splits, and with
    test-time augmentation when ``test_tta``: a `bloodcell.train.TestResult`, as a training run's final
    model makes."""
    from bloodcell.evaluation.results import add_tta, final_result
    from bloodcell.serving.prediction import predict_arrays

    splits, batch = data.splits, int(cfg.batch_size)
    val_probabilities = predict_arrays(model, splits.val.images, batch)
    probabilities = predict_arrays(model, splits.test.images, batch)
    result = final_result(model, splits, val_probabilities, probabilities, bool(cfg.calibrate))
    if cfg.test_tta:
        add_tta(result, splits, batch)
    return result


def ensemble_config(cfg: DictConfig, client: Any, ensemble: Ensemble) -> DictConfig:
    """The config the ensemble run records: this command's, with the members and their weights
    (params ``ensemble.members``, ``ensemble.runs``, ``ensemble.weights``), and the first member's data,
    cleaning and seed, so that compare and promote load its test images again as they do a training run's."""
    from bloodcell.training.run_data import run_config as member_config

    first = member_config(ensemble.members[0].run)
    run_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    assert isinstance(run_cfg, DictConfig)
    for key in ("data", "cleaning", "seed", "objective"):
        if key in first:
            run_cfg[key] = first[key]
    run_cfg.model_name = cfg.model_name or first.get("model_name")  # an older member run may have none
    run_cfg.ensemble = {
        "members": len(ensemble.members),
        "runs": [m.run_id for m in ensemble.members],
        "weights": ensemble.weights,
    }
    sweep = cfg.sweep
    if sweep:  # nested under the sweep: in its experiment
        parent = client.get_run(sweep)
        run_cfg.tracking.parent_run_id = sweep
        run_cfg.tracking.experiment = client.get_experiment(parent.info.experiment_id).name
    elif not cfg.tracking.experiment:
        run_cfg.tracking.experiment = ensemble.members[0].experiment
    if not cfg.tracking.run_name:
        run_cfg.tracking.run_name = f"ensemble-{cfg.selection}-{len(ensemble.members)}"
    return run_cfg


def record_ensemble(run_cfg: DictConfig, ensemble: Ensemble) -> str:
    """The ensemble as an MLflow run with a training run's records: config, datasets, test metrics and
    plots, both splits' predictions, calibration and abstention, the model with its signature; plus which
    runs it averages. ``best_val_accuracy`` is its validation accuracy (it has no epochs), so that promote
    and the MLflow UI rank it beside the trials."""
    from hydra.core.hydra_config import HydraConfig

    from bloodcell import tracking
    from bloodcell.data.mlflow_inputs import dataset_inputs
    from bloodcell.training import checkpoints
    from bloodcell.training.record import record_calibration, record_evaluation, record_predictions

    data, result = ensemble.data, ensemble.result
    first = ensemble.members[0]
    tags = {k: first.tags[k] for k in DATA_TAGS if k in first.tags}
    tags |= {ENSEMBLE_TAG: "true", "ensemble.member_runs": ",".join(m.run_id for m in ensemble.members)}
    tags |= {f"ensemble.member_{i}": m.run_id for i, m in enumerate(ensemble.members)}
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    experiment_id = tracking.setup_experiment(run_cfg.tracking)
    root = checkpoints.root_for(tracking.resolve_tracking_uri(run_cfg.tracking))
    with tracking.start_run(run_cfg, tags=tags, experiment_id=experiment_id, local_root=root) as recorder:
        run_id = recorder.run_id
        recorder.log_config(run_cfg, overrides)
        recorder.log_inputs(dataset_inputs(run_cfg.data, data.arrays, data.splits))
        recorder.log_metrics(
            {
                "best_val_accuracy": result.val.evaluation.metrics["final_val_accuracy"],
                "ensemble_members": float(len(ensemble.members)),
            }
        )
        record_evaluation(recorder, result.evaluation, None, None)
        if tta := result.tta_metrics():  # no empty request for a run without TTA
            recorder.log_metrics(tta)
        record_predictions(recorder, data.splits.test, result)
        record_calibration(recorder, data.splits.test, result, run_cfg.get("trainer", {}).get("abstention"))
        if run_cfg.tracking.log_model:
            example = data.splits.test.images[:2].astype(np.float32)
            recorder.log_model(result.model, example, result.probabilities[:2], root / run_id)
    # the model's local copy (and a server's outbox) lives there until the records are through
    if not tracking.outbox_waiting(root / run_id):
        checkpoints.delete(root / run_id)
    return run_id


def check_config(cfg: DictConfig) -> None:
    """The command's own keys, before MLflow is asked anything."""
    from bloodcell.evaluation.candidates import run_specs

    if cfg.selection not in SELECTIONS:
        raise UserError(f"selection={cfg.selection!r} is unknown; use topk or greedy")
    for key in ("top", "size", "batch_size"):
        if int(cfg[key]) < 1:
            raise UserError(f"{key}={cfg[key]} must be >= 1")
    if not run_specs(cfg.runs) and not cfg.sweep:
        raise UserError("say which runs: runs=[<run id>,<run id>] or sweep=<parent run id> top=<k>")


def make_ensemble(cfg: DictConfig) -> Ensemble:
    """Members -> selection -> one Keras model -> evaluated on the members' splits -> logged as a run (with
    ``log``). Everything the user can get wrong is checked before any model loads or any run starts."""
    import mlflow

    from bloodcell.evaluation.candidates import candidates, run_specs
    from bloodcell.serving.loading import load_model, set_tracking
    from bloodcell.training.run_data import run_splits

    check_config(cfg)
    set_tracking(cfg.tracking)
    client = mlflow.MlflowClient()
    models = candidates(client, run_specs(cfg.runs), cfg.sweep, int(cfg.top), command="ensemble")
    check_members(models)
    members, weights = select(client, models, str(cfg.selection), int(cfg.size))
    data = run_splits(members[0].run)
    model = build_ensemble([load_model(m.model_uri) for m in members], weights)
    ensemble = Ensemble(members, weights, model, data, None)
    ensemble.result = evaluate(cfg, model, data)
    ensemble.config = ensemble_config(cfg, client, ensemble)
    ensemble.run_id = record_ensemble(ensemble.config, ensemble) if cfg.log else ""
    return ensemble
