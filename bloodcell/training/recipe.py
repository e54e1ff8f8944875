"""The training recipe behind `python -m bloodcell.train`: one tracked, two-phase training run.

``train(cfg)`` is the recipe as a list of named steps: load splits (`run_data`) -> start or resume the
MLflow run (`resume`, `bloodcell.tracking`) -> build (`setup`) -> fit phase 1 and phase 2 (`phases`,
`phase1_cache`) -> evaluate -> record (`record`). Each step is a function of its own; what a run records
goes through the run's `Recorder`, the Keras callbacks live in `callbacks`. It returns the objective (best
epoch's ``cfg.objective``) for a sweeper.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from bloodcell import tracking
from bloodcell.evaluation.results import TestResult, final_result
from bloodcell.training import phase1_cache
from bloodcell.training.phases import Phase, RunCallbacks, compile_for, fine_tune, train_head, wants_phase2
from bloodcell.training.record import RunContext, Stopwatch, record, record_inputs
from bloodcell.training.resume import Resume, config_digest, start_or_resume
from bloodcell.training.run_data import Targets, load_splits
from bloodcell.training.setup import Setup, build, distribution_strategy

if TYPE_CHECKING:
    from bloodcell.data import Splits

log = logging.getLogger("bloodcell.train")


# ---- checks before anything starts ----------------------------------------------------------------------


def check_config(cfg: DictConfig) -> None:
    """Every value of the config within its domain (bloodcell.core.settings, one model per config group),
    before any data is read, any MLflow run started or TensorFlow imported: a typo costs a second."""
    from bloodcell.core.settings import check_train_config

    check_train_config(cfg)


# ---- step 1: data ----------------------------------------------------------------------------------------


# ---- step 2: the MLflow run: a new one, or the one to continue -------------------------------------------


# ---- step 3: devices and the model -------------------------------------------------------------------------


# ---- step 4: the two phases -------------------------------------------------------------------------


def fit_both_phases(
    cfg: DictConfig,
    setup: Setup,
    callbacks: RunCallbacks,
    resume: Resume | None,
    cache: phase1_cache.Phase1Cache | None = None,
) -> int | None:
    """Phase 1, then phase 2 when the config wants it and time is left; a resumed run goes on in the phase
    its checkpoint was written in. Returns the global epoch phase 2 started at (None without phase 2)."""
    if resume is not None and resume.checkpoint.state["phase"] == "phase2":
        phase1_epochs = int(resume.checkpoint.state["phase1_epochs"])
        fine_tune(cfg, setup, callbacks, phase1_epochs, resume)
        return phase1_epochs
    if cache is None:
        phase1_epochs = train_head(cfg, setup, callbacks, resume)
    else:  # trained once per key, loaded by every later run with that key (trainer.reuse_phase1)
        phase1_epochs = phase1_cache.train_or_reuse(
            cache,
            setup,
            callbacks,
            prepare=lambda: compile_for(setup, Phase.first(cfg), cfg.trainer),
            train_phase1=lambda: train_head(cfg, setup, callbacks),
        )
    if wants_phase2(cfg) and not callbacks.out_of_time():
        fine_tune(cfg, setup, callbacks, phase1_epochs)
        return phase1_epochs
    return None


# ---- step 5: evaluate and record ------------------------------------------------------------------


def evaluate_splits(cfg: DictConfig, setup: Setup, splits: Splits) -> TestResult:
    """The final model on the validation split (one more predict, kept so that runs can be compared image by
    image later) and on the held-out test split, touched once: plain predictions, and test-time
    augmentation when asked."""
    from bloodcell.data import make_tf_dataset
    from bloodcell.evaluation.metrics import evaluate_predictions

    test = splits.test
    val_probabilities = setup.model.predict(setup.val_ds.map(lambda x, y: x), verbose=0)
    test_ds = make_tf_dataset(test, setup.batch_size, training=False, seed=cfg.seed)
    probabilities = setup.model.predict(test_ds.map(lambda x, y: x), verbose=0)
    calibrate = bool(cfg.trainer.get("calibrate", True))
    result = final_result(setup.model, splits, val_probabilities, probabilities, calibrate)
    model = result.model
    if cfg.trainer.get("test_tta"):
        from bloodcell.serving.prediction import predict_arrays

        # with the logged model: the mean over views of calibrated probabilities, as predict tta=true gives
        tta = predict_arrays(model, test.images, setup.batch_size, tta=True)
        result.tta = evaluate_predictions(test.labels, tta, "test_tta_")
        log.info("test accuracy with test-time augmentation %.4f", result.tta.metrics["test_tta_accuracy"])
    return result


def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


# ---- the recipe ---------------------------------------------------------------------------------------


def train(cfg: DictConfig, targets: Callable[[Splits], Targets] | None = None) -> float:
    """Run both phases, evaluate, record everything in MLflow; return the best ``cfg.objective``.
    ``targets`` (bloodcell.distill) gives the training split other targets than its one-hot labels, once
    the splits are cut and before the run starts."""
    check_config(cfg)
    tracking.check_reachable(tracking.resolve_tracking_uri(cfg.tracking))
    timed = Stopwatch()
    with timed("data"):
        data = load_splits(cfg)
    if targets is not None:
        with timed("targets"):
            data.use_targets(targets(data.splits))
    strategy = distribution_strategy(cfg.trainer)
    experiment_id, resume, run_dirs = start_or_resume(cfg, data)
    tags = data.tags() | {"config_digest": config_digest(cfg)}
    resume_id = resume.run_id if resume else None
    with tracking.start_run(
        cfg, tags=tags, experiment_id=experiment_id, resume_run_id=resume_id, local_root=run_dirs.root
    ) as recorder:
        run = RunContext(cfg, data, recorder, run_dirs.root / recorder.run_id, timed)
        if resume is not None:
            recorder.set_tags({"resumed_after_epoch": str(resume.checkpoint.epoch)})
        else:
            record_inputs(recorder, cfg, data, _hydra_overrides())
        setup = build(cfg, data.splits, strategy, preview_to=recorder if resume is None else None)
        with run_dirs.checkpointing(recorder.run_id) as run_dir:
            callbacks = RunCallbacks.for_run(cfg, setup, data.splits.train.images, run_dir, recorder)
            # a resumed run continues its own checkpoint; a new one may start phase 2 from a stored phase 1
            cache = None
            if resume is None:
                cache = phase1_cache.for_run(
                    cfg, data.tags(), run_dirs.root, strategy.num_replicas_in_sync, recorder.run_id
                )
            with timed("fit"):
                phase2_start = fit_both_phases(cfg, setup, callbacks, resume, cache)
        with timed("evaluate"):
            result = evaluate_splits(cfg, setup, data.splits)
        objective = record(run, setup.model, result, callbacks.epoch_log.history, phase2_start)
    run_dirs.finished(recorder.run_id)
    return objective
