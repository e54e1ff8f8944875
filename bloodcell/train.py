"""`python -m bloodcell.train`: one tracked, two-phase training run, composed by Hydra.

    python -m bloodcell.train +experiment=quickstart            # built-in demo data, CPU, minutes
    python -m bloodcell.train +experiment=effnetb2              # the reference recipe
    python -m bloodcell.train -m +sweeps=quick                  # an Optuna sweep (sweeps/quick.yaml)

Flow: config -> data (load, validate, clean, split) -> model -> phase 1 (backbone frozen) ->
phase 2 (top blocks unfrozen, low learning rate) -> test evaluation -> MLflow. ``train(cfg)`` returns the
objective (best epoch's ``cfg.objective``) for a sweeper.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from bloodcell import NUM_CLASSES, PROJECT_ROOT
from bloodcell.cli import run_or_exit
from bloodcell.errors import UserError

log = logging.getLogger("bloodcell.train")


#: trainer.mixed_precision values and the Keras dtype policy each sets (true = mixed_float16, the usual choice)
PRECISION_POLICIES = {
    False: None,
    True: "mixed_float16",
    "mixed_float16": "mixed_float16",
    "mixed_bfloat16": "mixed_bfloat16",
}


def precision_policy(trainer_cfg) -> str | None:
    """The Keras dtype policy ``trainer.mixed_precision`` asks for; None keeps float32. bfloat16 needs no loss
    scaling and on Hopper/Ampere GPUs beat float16 (benchmarks/gpu_throughput.py, README)."""
    value = trainer_cfg.get("mixed_precision")
    if value is None:
        return None
    if not isinstance(value, (bool, str)) or value not in PRECISION_POLICIES:
        raise UserError(
            f"trainer.mixed_precision={value!r} is unknown; use false, true (mixed_float16) or mixed_bfloat16"
        )
    return PRECISION_POLICIES[value]


def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked without TensorFlow, so a typo costs a second, not a model build."""
    from bloodcell.models.backbones import check_weights, get_spec

    get_spec(cfg.backbone.name)
    check_weights(cfg.backbone.weights)
    precision_policy(cfg.trainer)
    if cfg.trainer.distribute not in (None, "mirrored"):
        raise UserError(f"trainer.distribute={cfg.trainer.distribute!r} is unknown; use null or mirrored")
    if cfg.trainer.epochs < 1:
        raise UserError(f"trainer.epochs={cfg.trainer.epochs} must be >= 1")
    if cfg.finetune.epochs < 0:
        raise UserError(f"finetune.epochs={cfg.finetune.epochs} must be >= 0 (0 skips fine-tuning)")


CLEANING_CACHE = PROJECT_ROOT / "mlruns" / "cleaning_cache"


def load_splits(cfg: DictConfig):
    """Validated arrays, cleaned when ``data.clean`` (cached by data fingerprint and cleaning settings, so a
    sweep cleans once), then the stratified split. Returns (arrays as loaded, splits, CleaningResult or None)."""
    from bloodcell.data import Arrays, fingerprint, load_arrays, split_arrays

    arrays = load_arrays(cfg.data)
    cleaning = None
    if cfg.data.get("clean"):
        from bloodcell.clean import find_unwanted_cached, summary

        cleaning, cached = find_unwanted_cached(
            arrays.images, arrays.labels, cfg.cleaning, arrays.fingerprint, CLEANING_CACHE
        )
        log.info("cleaning%s: %s", " (cached)" if cached else "", summary(cleaning))
        images, labels = arrays.images[cleaning.keep], arrays.labels[cleaning.keep]
        kept = Arrays(images, labels, fingerprint(images, labels), f"{arrays.source} (cleaned)")
    else:
        kept = arrays
    splits = split_arrays(kept, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)
    return arrays, splits, cleaning


def log_cleaning(result, arrays) -> None:
    """Counts as metrics, the JSON report and the contact sheet of removed samples into the active run."""
    import tempfile
    from pathlib import Path

    import mlflow

    from bloodcell.clean import contact_sheet, report_dict

    mlflow.log_metrics(
        {
            "cleaning_removed": result.n_removed,
            **{f"cleaning_removed_{k}": v for k, v in result.counts.items()},
        }
    )
    mlflow.log_dict(report_dict(result, arrays.labels, arrays.source), "cleaning/report.json")
    if result.n_removed:
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(
                str(contact_sheet(result, arrays.images, arrays.labels, Path(tmp) / "removed.png")),
                "cleaning",
            )


def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _compile(model, lr: float, decay_steps: int, decay_rate: float, label_smoothing: float) -> None:
    import keras

    from bloodcell.finetune import optimizer

    model.compile(
        optimizer=optimizer(lr, decay_steps, decay_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy"],
    )


def _best(history: list[dict], objective: str) -> float:
    values = [h[objective] for h in history if objective in h and math.isfinite(h[objective])]
    if not values:
        raise RuntimeError(
            f"objective {objective!r} was never logged (or only NaN); "
            f"logged: {sorted(history[0]) if history else 'nothing'}"
        )
    return min(values) if "loss" in objective else max(values)


class Stopwatch:
    """Wall seconds per part of a run, logged as ``seconds_<part>`` metrics: where the time outside
    Keras' fit goes (benchmarks/overhead.py reads them)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, part: str):
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - tic

    def metrics(self) -> dict[str, float]:
        return {f"seconds_{part}": value for part, value in self.seconds.items()}


def _time_limit_callback():
    import keras

    class TimeLimit(keras.callbacks.Callback):
        """Stop after the epoch that crosses a wall-clock deadline (``trainer.time_limit_minutes``,
        counted from the start of phase 1 across both phases): compare recipes at equal cost."""

        def __init__(self, deadline: float):
            super().__init__()
            self.deadline = deadline

        def on_epoch_end(self, epoch, logs=None):
            if time.monotonic() >= self.deadline:
                log.info("time limit reached after epoch %d", epoch + 1)
                self.model.stop_training = True

    return TimeLimit


def train(cfg: DictConfig) -> float:
    """Run both phases, evaluate, record everything in MLflow; return the best ``cfg.objective``."""
    check_config(cfg)
    from bloodcell.tracking import check_reachable, resolve_tracking_uri

    check_reachable(resolve_tracking_uri(cfg.tracking))
    started = time.perf_counter()
    timed = Stopwatch()
    with timed("data"):
        arrays, splits, cleaning = load_splits(cfg)
    log.info(
        "data: %s, %d images %s -> train %d / val %d / test %d",
        arrays.source,
        len(arrays),
        arrays.images.shape[1:],
        len(splits.train),
        len(splits.val),
        len(splits.test),
    )
    if cleaning is None:
        tags = {"data_fingerprint": arrays.fingerprint, "data_source": arrays.source}
    else:
        # every split carries the fingerprint of the cleaned set it was cut from
        tags = {
            "data_fingerprint": arrays.fingerprint,
            "data_source": arrays.source,
            "data_fingerprint_cleaned": splits.train.fingerprint,
        }

    import keras
    import mlflow
    import numpy as np
    import tensorflow as tf

    from bloodcell import augment, evaluate, finetune, tracking
    from bloodcell.data import class_weights, make_tf_dataset
    from bloodcell.models import BACKBONE_LAYER, build_model

    policy = precision_policy(cfg.trainer)
    if policy:
        keras.mixed_precision.set_global_policy(policy)
    strategy = (
        tf.distribute.MirroredStrategy()
        if cfg.trainer.distribute == "mirrored"
        else tf.distribute.get_strategy()
    )

    if "trial" in cfg:
        tags["trial_number"] = str(cfg.trial.number)
    with tracking.start_run(cfg, tags=tags) as run:
        # seeded only now: MLflow draws its friendly run names from Python's `random`
        keras.utils.set_random_seed(cfg.seed)
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        mlflow.log_text(OmegaConf.to_yaml(_hydra_overrides()), "overrides.yaml")
        if cleaning is not None:
            log_cleaning(cleaning, arrays)

        in_model = cfg.augmentation.get("where", "pipeline") == "model"
        with strategy.scope():  # in the model its seed variables must live on the training devices
            augmentation = augment.build_augmentation(cfg.augmentation, cfg.seed)
        mixer = augment.build_mixer(cfg.augmentation, NUM_CLASSES, cfg.seed)
        batch = cfg.trainer.batch_size * strategy.num_replicas_in_sync
        train_ds = make_tf_dataset(
            splits.train,
            batch,
            training=True,
            seed=cfg.seed,
            augment=None if in_model else augmentation,
            mixer=mixer,
        )
        val_ds = make_tf_dataset(splits.val, batch, training=False, seed=cfg.seed)
        if augmentation is not None:
            grid = augment.preview_grid(
                splits.train.images[:6],
                augmentation,
                views=5,
                seed=cfg.seed,
                mixer=mixer,
                labels=splits.train.labels[:6],
            )
            mlflow.log_image(grid, "plots/augmentation_preview.png")

        with strategy.scope():
            model = build_model(cfg, splits.train.images.shape[1:])
            # With augmentation inside the model it runs on the accelerator; only `model` (without it)
            # is saved, so the logged model needs neither bloodcell nor KerasCV to load.
            trainable_model = keras.Sequential([augmentation, model]) if in_model and augmentation else model
            backbone = model.get_layer(BACKBONE_LAYER)
            finetune.set_backbone_trainable(
                backbone,
                not finetune.freeze_backbone_in_phase1(cfg),
                keep_batchnorm_frozen=finetune.freeze_batchnorm(cfg),
            )
            _compile(
                trainable_model,
                cfg.trainer.lr,
                cfg.trainer.lr_decay_steps,
                cfg.trainer.lr_decay_rate,
                cfg.trainer.label_smoothing,
            )

        from bloodcell.models.head import precise_batchnorm_callback

        precise_bn = precise_batchnorm_callback(
            model, splits.train.images, cfg.head.get("precise_bn_images") or 0, cfg.seed, batch
        )
        TimeLimit = _time_limit_callback()
        weights = class_weights(splits.train.labels) if cfg.trainer.class_weight == "balanced" else None
        epoch_log = tracking.epoch_logger()
        from bloodcell.trial import pruning_callback

        pruner = pruning_callback(cfg)

        deadline = (
            time.monotonic() + 60 * cfg.trainer.time_limit_minutes
            if cfg.trainer.get("time_limit_minutes")
            else None
        )

        def callbacks(patience: int) -> list:
            stop = keras.callbacks.EarlyStopping(
                monitor="val_accuracy", patience=patience, restore_best_weights=True, verbose=1
            )
            extra = [TimeLimit(deadline)] if deadline else []
            first = [precise_bn] if precise_bn is not None else []  # its statistics are what validation sees
            return [*first, epoch_log, stop, *extra] + ([pruner] if pruner is not None else [])

        verbose = cfg.trainer.verbose
        log.info(
            "phase 1: %d epochs, backbone %s, lr %g",
            cfg.trainer.epochs,
            "frozen" if finetune.freeze_backbone_in_phase1(cfg) else "trainable",
            cfg.trainer.lr,
        )
        with timed("fit"):
            history = trainable_model.fit(
                train_ds,
                validation_data=val_ds,
                epochs=cfg.trainer.epochs,
                shuffle=False,
                class_weight=weights,
                callbacks=callbacks(cfg.trainer.early_stopping_patience),
                verbose=verbose,
            )
        phase1_epochs = len(history.epoch)
        phase1_best = _best(epoch_log.history, "val_accuracy")
        phase1_weights = model.get_weights()
        phase2_start = None
        out_of_time = deadline is not None and time.monotonic() >= deadline
        if (
            cfg.finetune.epochs > 0
            and not out_of_time
            and (cfg.finetune.unfreeze_blocks != 0 or cfg.finetune.get("unfreeze_layers"))
        ):
            with strategy.scope():
                trainable_layers = finetune.unfreeze(backbone, cfg)
                _compile(
                    trainable_model,
                    cfg.finetune.lr,
                    cfg.finetune.lr_decay_steps,
                    cfg.finetune.lr_decay_rate,
                    cfg.trainer.label_smoothing,
                )
            log.info(
                "phase 2: %d epochs, %d backbone layers trainable, lr %g",
                cfg.finetune.epochs,
                trainable_layers,
                cfg.finetune.lr,
            )
            mlflow.log_metric("finetune_trainable_layers", trainable_layers)
            phase2_start = phase1_epochs
            with timed("fit"):
                trainable_model.fit(
                    train_ds,
                    validation_data=val_ds,
                    initial_epoch=phase1_epochs,
                    shuffle=False,
                    epochs=phase1_epochs + cfg.finetune.epochs,
                    class_weight=weights,
                    callbacks=callbacks(cfg.finetune.early_stopping_patience),
                    verbose=verbose,
                )
            # Early stopping restored phase 2's best epoch; if fine-tuning never beat phase 1, the model
            # the run reports and saves is phase 1's best, as "restore the best weights" promises.
            phase2_best = _best(epoch_log.history[phase1_epochs:], "val_accuracy")
            if phase2_best < phase1_best:
                model.set_weights(phase1_weights)
            mlflow.set_tag("final_weights", "phase2" if phase2_best >= phase1_best else "phase1")

        objective = _best(epoch_log.history, cfg.objective)
        with timed("evaluate"):
            test_ds = make_tf_dataset(splits.test, batch, training=False, seed=cfg.seed)
            probabilities = model.predict(test_ds.map(lambda x, y: x), verbose=0)
            result = evaluate.evaluate_predictions(splits.test.labels, probabilities)
            mlflow.log_metrics({f"best_{cfg.objective}": objective, **result.metrics})
            if cfg.trainer.get("test_tta"):
                from bloodcell.predict import predict_arrays

                tta = evaluate.evaluate_predictions(
                    splits.test.labels,
                    predict_arrays(model, splits.test.images, batch, tta=True),
                    "test_tta_",
                )
                mlflow.log_metrics(tta.metrics)
                log.info("test accuracy with test-time augmentation %.4f", tta.metrics["test_tta_accuracy"])
            mlflow.log_dict(result.report, "classification_report.json")
            mlflow.log_figure(evaluate.confusion_figure(result.confusion), "plots/confusion_matrix.png")
            mlflow.log_figure(
                evaluate.curves_figure(epoch_log.history, phase2_start), "plots/training_curves.png"
            )

        if cfg.tracking.log_model:
            from mlflow.models import infer_signature

            with timed("log_model"):
                # the test predictions give the output example: another predict call would trace anew
                sample = splits.test.images[:2].astype(np.float32)
                info = mlflow.keras.log_model(
                    model,
                    name="model",
                    signature=infer_signature(sample, probabilities[:2]),
                    # pinned rather than inferred: inference imports and inspects every module (seconds).
                    pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
                )
                mlflow.set_tag("model_uri", info.model_uri)
        timed.seconds["in_train"] = time.perf_counter() - started
        mlflow.log_metrics(timed.metrics())
        log.info(
            "test accuracy %.4f, macro-F1 %.4f; best %s %.4f; run %s (%.0f s, %.0f s in fit)",
            result.metrics["test_accuracy"],
            result.metrics["test_macro_f1"],
            cfg.objective,
            objective,
            run.info.run_id,
            timed.seconds["in_train"],
            timed.seconds["fit"],
        )
    return objective


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="train")
def main(cfg: DictConfig) -> float:
    return run_or_exit(train, cfg)


if __name__ == "__main__":
    main()
