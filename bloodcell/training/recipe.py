"""The training recipe behind `python -m bloodcell.train`: one tracked, two-phase training run.

``train(cfg)`` is the recipe as a list of named steps: load splits (`run_data`) -> start or resume the
MLflow run (`resume`, `bloodcell.tracking`) -> build (`setup`) -> fit phase 1 and phase 2 (`phases`,
`phase1_cache`) -> evaluate -> record (`record`). Each step is a function of its own; what a run records
goes through the run's `Recorder`, the Keras callbacks live in `callbacks`. It returns the objective (best
epoch's ``objective``) for a sweeper. The config is checked once, first, and each step is handed the
groups of the settings that come of it (`bloodcell.core.settings`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from omegaconf import DictConfig

from bloodcell import tracking
from bloodcell.core.heap import Collector, deferred_collection
from bloodcell.core.settings import TrainerSchema, TrainSchema
from bloodcell.evaluation.results import TestResult, add_tta, final_result
from bloodcell.training import phase1_cache
from bloodcell.training.phases import Phase, RunCallbacks, compile_for, fine_tune, train_head, wants_phase2
from bloodcell.training.record import RunContext, Stopwatch, record, record_inputs
from bloodcell.training.resume import Resume, config_digest, ended_trial_outcome, start_or_resume
from bloodcell.training.run_data import Targets, start_loading
from bloodcell.training.setup import Setup, build, distribution_strategy

if TYPE_CHECKING:
    import numpy as np

    from bloodcell.data import Splits

log = logging.getLogger("bloodcell.train")

S = TypeVar("S", bound=TrainSchema)


# ---- checks before anything starts ----------------------------------------------------------------------


def check_config(cfg: DictConfig, schema: type[S] = TrainSchema) -> S:  # type: ignore[assignment]
    """Every value of the config within its domain, before any data is read, any MLflow run started or
    TensorFlow imported: a typo costs a second. First the schema's pass (bloodcell.core.settings, one model
    per config group; ``schema``: another command's config that extends the train config), then what only
    the code knows: the backbone exists and its weights file too, the cleaning settings are complete. Returns
    the run's settings, which every later step reads (each its own group)."""
    from bloodcell.core.settings import train_settings
    from bloodcell.models.backbones import check_backbone

    settings = train_settings(cfg, schema)
    check_backbone(settings.backbone)
    if settings.data.clean:
        from bloodcell.data.cleaning.config import resolve_cfg

        resolve_cfg(settings.cleaning)
    return settings


# ---- step 1: data ----------------------------------------------------------------------------------------


# ---- step 2: the MLflow run: a new one, or the one to continue -------------------------------------------


# ---- step 3: devices and the model -------------------------------------------------------------------------


# ---- step 4: the two phases -------------------------------------------------------------------------


def fit_both_phases(
    settings: TrainSchema,
    setup: Setup,
    callbacks: RunCallbacks,
    resume: Resume | None,
    cache: phase1_cache.Phase1Cache | None = None,
) -> int | None:
    """Phase 1, then phase 2 when the config wants it and time is left; a resumed run goes on in the phase
    its checkpoint was written in. Returns the global epoch phase 2 started at (None without phase 2)."""
    trainer = settings.trainer
    if resume is not None and resume.checkpoint.state["phase"] == "phase2":
        phase1_epochs = int(resume.checkpoint.state["phase1_epochs"])
        fine_tune(settings, setup, callbacks, phase1_epochs, resume)
        return phase1_epochs
    if cache is None:
        phase1_epochs = train_head(trainer, setup, callbacks, resume)
    else:  # trained once per key, loaded by every later run with that key (trainer.reuse_phase1)
        phase1_epochs = phase1_cache.train_or_reuse(
            cache,
            setup,
            callbacks,
            prepare=lambda: compile_for(setup, Phase.first(trainer), trainer),
            train_phase1=lambda: train_head(trainer, setup, callbacks),
        )
    if wants_phase2(settings.finetune) and not callbacks.out_of_time():
        fine_tune(settings, setup, callbacks, phase1_epochs)
        return phase1_epochs
    return None


# ---- step 5: evaluate and record ------------------------------------------------------------------


def evaluate_splits(
    trainer: TrainerSchema,
    seed: int,
    setup: Setup,
    splits: Splits,
    val_probabilities: np.ndarray | None = None,
) -> TestResult:
    """The final model on the validation split (kept so that runs can be compared image by image later) and
    on the held-out test split, touched once: plain predictions, calibrated when ``trainer.calibrate``, and
    test-time augmentation on both when ``trainer.test_tta``. ``val_probabilities``: the final model's, when
    its epoch's validation pass kept them (`RunCallbacks.final_val_probabilities`); else one more predict."""
    from bloodcell.data import make_tf_dataset

    test = splits.test
    if val_probabilities is None:
        val_probabilities = setup.model.predict(setup.val_ds.map(lambda x, y: x), verbose=0)
    test_ds = make_tf_dataset(test, setup.batch_size, training=False, seed=seed)
    probabilities = setup.model.predict(test_ds.map(lambda x, y: x), verbose=0)
    result = final_result(setup.model, splits, val_probabilities, probabilities, trainer.calibrate)
    if trainer.test_tta:
        add_tta(result, splits, setup.batch_size)
    return result


def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


# ---- the recipe ---------------------------------------------------------------------------------------


def train(
    cfg: DictConfig,
    targets: Callable[[Splits], Targets] | None = None,
    settings: TrainSchema | None = None,
) -> float:
    """Run both phases, evaluate, record everything in MLflow; return the best ``objective``.

    ``cfg`` is checked here once (`check_config`) unless its ``settings`` come with it (a command that
    checked it with a schema of its own: bloodcell.distill); the steps read the settings, and ``cfg``
    itself is kept only as the record of the run (its params and config.yaml, the config digest, the
    phase-1 key). ``targets`` (bloodcell.distill) gives the training split other targets than its one-hot
    labels, once the splits are cut and before the run starts."""
    if settings is None:
        settings = check_config(cfg)
    # no cyclic garbage collection while the run starts: each pass would walk all of TensorFlow (core.heap)
    with deferred_collection() as collector:
        return run_steps(cfg, settings, targets, collector)


def run_steps(
    cfg: DictConfig,
    settings: TrainSchema,
    targets: Callable[[Splits], Targets] | None,
    collector: Collector,
) -> float:
    """`train`'s steps, its config checked; ``collector.settle()`` once the run is built, before it fits."""
    uri = tracking.resolve_tracking_uri(settings.tracking)
    tracking.check_reachable(uri, wait=tracking.server_wait(settings.tracking))
    with tracking.patient_requests(settings.tracking):
        ended = ended_trial_outcome(settings)  # a sweep trial whose run ended before its sweep recorded it
    if ended is not None:
        return ended
    timed = Stopwatch()
    with timed("data"):  # the input is checked now; the pixels are read while TensorFlow is imported
        loading = start_loading(settings.data, settings.seed, settings.cleaning)
    strategy = distribution_strategy(settings.trainer)
    with timed("data"):
        data = loading.result()
    if targets is not None:
        with timed("targets"):
            data.use_targets(targets(data.splits))
    digest = config_digest(cfg)
    with tracking.patient_requests(settings.tracking):
        experiment_id, resume, run_dirs = start_or_resume(
            settings.tracking, settings.trainer, settings.trial, digest, data
        )
    tags = data.tags() | {"config_digest": digest}
    resume_id = resume.run_id if resume else None
    with tracking.start_run(
        cfg,
        tags=tags,
        experiment_id=experiment_id,
        resume_run_id=resume_id,
        local_root=run_dirs.root,
        tracking_settings=settings.tracking,
        trial=settings.trial,
    ) as recorder:
        run = RunContext(
            settings.objective,
            settings.tracking,
            data,
            recorder,
            run_dirs.root / recorder.run_id,
            timed,
            settings.trainer.abstention,
        )
        if resume is not None:
            recorder.set_tags({"resumed_after_epoch": str(resume.checkpoint.epoch)})
        else:
            record_inputs(recorder, cfg, settings.data, data, _hydra_overrides())
        setup = build(settings, data.splits, strategy, preview_to=recorder if resume is None else None)
        with run_dirs.checkpointing(recorder.run_id) as run_dir:
            callbacks = RunCallbacks.for_run(settings, setup, data.splits, run_dir, recorder)
            # a resumed run continues its own checkpoint; a new one may start phase 2 from a stored phase 1
            cache = None
            if resume is None:
                cache = phase1_cache.for_run(
                    cfg,
                    settings.trainer,
                    data.tags(),
                    run_dirs.root,
                    strategy.num_replicas_in_sync,
                    recorder.run_id,
                )
            collector.settle()  # what lives now lives as long as the run: later collections skip it
            with timed("fit"):
                phase2_start = fit_both_phases(settings, setup, callbacks, resume, cache)
        with timed("evaluate"):
            val_probabilities = callbacks.final_val_probabilities()
            result = evaluate_splits(settings.trainer, settings.seed, setup, data.splits, val_probabilities)
        study = callbacks.pruner.trial.study if callbacks.pruner is not None else None
        objective = record(run, setup.model, result, callbacks.epoch_log.history, phase2_start, study)
    run_dirs.finished(recorder.run_id)
    return objective
