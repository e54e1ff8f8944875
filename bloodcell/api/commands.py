"""The commands as functions: each composes the config its command composes (conf/<command>.yaml, the same
override strings), calls the library function the command calls, and returns an object instead of printing.
Every call leaves the process clean for the next one (`bloodcell.api.session.clean_process`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloodcell.api.results import (
    ComparisonResult,
    Explanation,
    Picture,
    PromotionResult,
    RunResult,
    SweepResult,
)
from bloodcell.api.session import clean_process, compose, compose_with_hydra, one_line
from bloodcell.core.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from omegaconf import DictConfig


def train(*overrides: str) -> RunResult:
    """One training run, as ``python -m bloodcell.train <overrides>`` makes it (a repeated or
    cross-validated one too: then the group run), recorded in MLflow.

    >>> run = train("+experiment=quickstart", "trainer.epochs=1")  # doctest: +SKIP
    >>> run.metrics["test_accuracy"], run.model_uri  # doctest: +SKIP
    """
    with clean_process():
        cfg = compose("train", overrides)
        import mlflow

        from bloodcell.training.repeats import plan, train_members

        train_members(cfg)
        # the recipe returns the objective (a sweeper's); the run it made is the last one this process started
        last = mlflow.last_active_run()
        assert last is not None, "the recipe returned without starting an MLflow run"
        run_id = last.info.run_id
        if plan(cfg)[0]:  # repeats or folds: the members' group run, which holds their mean
            run_id = last.data.tags["mlflow.parentRunId"]
        return RunResult.of(run_id, mlflow.get_tracking_uri(), cfg)


def sweep(study: str, *overrides: str) -> SweepResult:
    """An Optuna sweep of the study ``sweeps/<study>.yaml``, as ``python -m bloodcell.train -m
    +sweeps=<study> <overrides>`` runs it; the study and its MLflow parent run read back when it is done.

    The sweep runs as that command, in a child process: a Hydra multirun is the sweeper plugin's loop around
    Hydra's launcher, which Hydra's compose API (what the other functions use) does not run, and inside this
    process it would reconfigure the notebook's logging, install its own signal handlers and keep Hydra's
    global state for the length of the sweep. A child process also gets what the command gets: the same
    launchers (joblib, SLURM), resuming, and a crash that cannot take the notebook's kernel with it. Its
    output is shown as it comes. The config is composed and checked here first, so a bad value is the
    command's one line as a UserError, in a second, before the child starts.

    Overrides in sweep syntax (``finetune.lr=1e-5,1e-4``) add to the study's search space, as on the
    command line; ``hydra.sweeper.n_trials=2`` makes it smaller, ``hydra.sweeper.storage=journal:<file>``
    and ``hydra.sweep.dir=<folder>`` keep it out of the project's folders.
    """
    with clean_process():
        cfg, sweeper = _check_sweep(study, overrides)
        _run_sweep(study, overrides)
        return _read_sweep(cfg, sweeper, study)


def runs(
    experiment: str | None = None,
    *overrides: str,
    filter_string: str = "",
    order_by: Sequence[str] | None = None,
    max_results: int = 1000,
) -> pd.DataFrame:
    """The runs of an MLflow experiment as a DataFrame, one row per run (``run_id``, ``status``,
    ``metrics.*``, ``params.*``, ``tags.*``): what the MLflow UI's runs table shows, filtered as it filters
    (``filter_string="metrics.test_accuracy > 0.9"``, ``order_by=["metrics.best_val_accuracy DESC"]``).
    ``experiment``: null is the train config's ``tracking.experiment``; ``overrides`` pick the store
    (``tracking.uri=...``)."""
    with clean_process():
        cfg = compose("train", overrides)
        import mlflow

        from bloodcell.tracking import connect

        connect(cfg.tracking)
        name = experiment or str(cfg.tracking.experiment)
        if mlflow.get_experiment_by_name(name) is None:
            known = ", ".join(sorted(e.name for e in mlflow.search_experiments())) or "none"
            store = mlflow.get_tracking_uri()
            raise UserError(f"experiment {name!r} not found in {store} (experiments: {known})")
        table = mlflow.search_runs(
            experiment_names=[name],
            filter_string=filter_string,
            order_by=list(order_by) if order_by else None,
            max_results=max_results,
            output_format="pandas",
        )
        return table


def compare(models: Any, *overrides: str) -> ComparisonResult:
    """Two or more models on the same images, as ``python -m bloodcell.compare`` compares them: ``models``
    is a list of run ids, URIs or results (the first is the reference, A), or a `SweepResult` (its best
    trials: ``top=<k>``). Logged as a run of experiment ``compare`` unless ``log=false``."""
    with clean_process():
        cfg = _with_models(compose("compare", _with_store(models, overrides)), models)
        from bloodcell.evaluation.comparison_report import compare_configured

        compared = compare_configured(cfg)
        run_id, uri, experiment_id = compared.run_id or None, compared.tracking_uri, None
        if run_id:
            import mlflow

            experiment_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
        return ComparisonResult(compared.comparison, run_id, experiment_id, uri)


def ensemble(models: Any, *overrides: str) -> RunResult:
    """Several runs averaged into one Keras model, evaluated and logged as a run of its own, as
    ``python -m bloodcell.ensemble`` makes it: ``models`` is a list of run ids, URIs or results, or a
    `SweepResult` (its ``top`` best trials; ``selection=greedy size=<n>`` to pick)."""
    with clean_process():
        cfg = _with_models(compose("ensemble", _with_store(models, overrides)), models)
        import mlflow

        from bloodcell.evaluation.ensemble import make_ensemble

        made = make_ensemble(cfg)
        if not made.run_id:
            raise UserError("ensemble(..., 'log=false') logs no run to return; leave log=true")
        return RunResult.of(made.run_id, mlflow.get_tracking_uri(), made.config)


def promote(*overrides: Any) -> PromotionResult:
    """The best finished run -> a registered model version -> the alias when the champion gate lets it, as
    ``python -m bloodcell.promote`` does: ``promote("experiment=quickstart")``, or a `RunResult`
    (``promote(run)``: that run alone, ``run=<id>``)."""
    given = [o for o in overrides if not isinstance(o, str)]
    strings = [o for o in overrides if isinstance(o, str)]
    with clean_process():
        from bloodcell.serving.promotion import expand_experiment_shorthand, promote_configured

        runs_given = [f"run={_run_id(o)}" for o in given]
        cfg = compose("promote", _with_store(given, [*runs_given, *expand_experiment_shorthand(strings)]))
        import mlflow

        settings, promotion = promote_configured(cfg)
        return PromotionResult(promotion, settings.alias, mlflow.get_tracking_uri())


def predict(model: Any, images: Any, *overrides: str) -> np.ndarray:
    """Class probabilities (N, 8), float32, calibrated when the model is, for ``images``: uint8 (N, H, W, 3)
    or a path (npz, image folder, image file), as ``python -m bloodcell.predict`` computes them (``tta=true``,
    ``batch_size=``; images of another size resized to the model's, bilinear). ``model``: a URI
    (``models:/bloodcell@champion``, ``runs:/<id>/model``, a .keras file), a result, or a Keras model."""
    with clean_process():
        cfg = compose("predict", _with_store([model], overrides))
        from bloodcell.serving.loading import resize_for
        from bloodcell.serving.prediction import check_images, predict_arrays

        data = _images(images)
        check_images(data.images, (None, None, 3), _source(images))
        keras_model = _load(model, cfg)
        size = resize_for(keras_model, data.images)
        return predict_arrays(keras_model, data.images, int(cfg.batch_size), bool(cfg.tta), resize_to=size)


def explain(model: Any, images: Any, *overrides: str, labels: Any = None) -> Explanation:
    """What the model looked at, as ``python -m bloodcell.explain`` draws it (Grad-CAM), shown inline: with
    labels (``labels=`` or an npz that has them) per class the most confident correct and wrong image with
    its heat map, and the errors; without, every image (up to ``limit=``) with its heat map."""
    with clean_process():
        cfg = compose("explain", _with_store([model], overrides))
        from bloodcell.evaluation.explanation import explain_images, select_images

        source = _source(images)
        data = select_images(_images(images, labels), cfg.limit, source)
        explained = explain_images(_load(model, cfg), data, source, cfg.layer, int(cfg.batch_size))
        pictures = {name: Picture(sheet.png(), name) for name, sheet in explained.sheets.items()}
        gradcam, errors = pictures["gradcam"], pictures.get("errors")
        return Explanation(gradcam, errors, explained.layer, explained.probabilities)


# ---- what the functions share ---------------------------------------------------------------------------


def _run_id(result: Any) -> str:
    if isinstance(result, RunResult):
        return result.run_id
    if isinstance(result, PromotionResult):
        return result.promotion.run_id
    if isinstance(result, str):
        return result
    raise UserError(f"expected a run id or a RunResult, got {type(result).__name__}")


def _with_store(objects: Any, overrides: Sequence[str]) -> list[str]:
    """``overrides``, with the tracking store of the first result among ``objects`` (RunResult,
    SweepResult, ...) unless they name one: a result found in one store is looked up there."""
    overrides = list(overrides)
    if any(o.startswith(("tracking.uri=", "+tracking.uri=", "++tracking.uri=")) for o in overrides):
        return overrides
    items = objects if isinstance(objects, (list, tuple)) else [objects]
    stores = [getattr(o, "tracking_uri", None) for o in items]
    store = next((s for s in stores if s), None)
    return [f"tracking.uri={store}", *overrides] if store else overrides


def _with_models(cfg: DictConfig, models: Any) -> DictConfig:
    """``runs`` (and ``sweep``) of a compare or ensemble config from the function's ``models`` argument:
    set on the composed config, not written as an override, so that a URI needs no quoting."""
    if isinstance(models, SweepResult):
        if not models.parent_run_id:
            raise UserError(f"study {models.study_name!r} has no MLflow parent run to take trials from")
        cfg.sweep = models.parent_run_id
    elif models:
        items = models if isinstance(models, (list, tuple)) else [models]
        cfg.runs = [m.run_id if isinstance(m, RunResult) else _model_spec(m) for m in items]
    return cfg


def _model_spec(model: Any) -> str:
    if isinstance(model, RunResult):
        return model.model_uri or f"runs:/{model.run_id}/model"
    if isinstance(model, PromotionResult):
        return model.model_uri
    if isinstance(model, (str, Path)):
        return str(model)
    raise UserError(f"expected a run id, a model URI or a result, got {type(model).__name__}")


def _load(model: Any, cfg: DictConfig) -> Any:
    """A Keras model as given, or loaded from what names it, in the config's tracking store."""
    if hasattr(model, "predict_on_batch"):  # a Keras model already
        return model
    from bloodcell.serving.loading import load_model, resolve_model_uri, set_tracking

    set_tracking(cfg.tracking)
    return load_model(resolve_model_uri(_model_spec(model)))


def _source(images: Any) -> str:
    return str(images) if isinstance(images, (str, Path)) else "the given array"


def _images(images: Any, labels: Any = None) -> Any:  # bloodcell.serving.prediction.Images
    """A path read as the commands read ``input=``, or an array of uint8 images (N, H, W, 3)."""
    import numpy as np

    from bloodcell.serving.prediction import Images, read_images

    if isinstance(images, (str, Path)):
        data = read_images(images)
        if labels is not None:
            data.labels = np.asarray(labels).reshape(-1).astype(np.int64)
        return data
    array = np.asarray(images)
    if array.ndim == 3:  # one image
        array = array[None]
    if array.ndim != 4:
        raise UserError(f"images must be an array (N, height, width, 3) or a path; got shape {array.shape}")
    names = [str(i) for i in range(len(array))]
    label_ids = None if labels is None else np.asarray(labels).reshape(-1).astype(np.int64)
    if label_ids is not None and len(label_ids) != len(array):
        raise UserError(f"{len(label_ids)} labels for {len(array)} images")
    return Images(array, names, label_ids)


def _check_sweep(study: str, overrides: Sequence[str]) -> tuple[DictConfig, DictConfig]:
    """The config a trial of the sweep runs with (overrides in sweep syntax left out: the sweeper samples
    them) and the sweeper's options; the trial config checked as a run's, so a bad value stops here."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from bloodcell.training.recipe import check_config

    if not study or not isinstance(study, str):
        raise UserError("say which study: sweep('<name of a file in sweeps/>', ...), e.g. sweep('quick')")
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise UserError(one_line(str(err))) from None
    fixed = [str(o.input_line) for o in parsed if not o.is_sweep_override()]
    cfg = compose("train", [f"+sweeps={study}", *fixed])
    check_config(cfg)
    sweeper = _sweeper_options([f"+sweeps={study}", *fixed])
    return cfg, sweeper


def _sweeper_options(overrides: list[str]) -> DictConfig:
    """``hydra.sweeper`` as the multirun would compose it (the study's name and storage)."""
    return compose_with_hydra("train", overrides).hydra.sweeper


def _run_sweep(study: str, overrides: Sequence[str]) -> None:
    """``python -m bloodcell.train -m +sweeps=<study> <overrides>`` in the project root, its output shown as
    it comes; a failure is the command's ``error:`` line as a UserError."""
    from bloodcell import PROJECT_ROOT

    command = [sys.executable, "-m", "bloodcell.train", "-m", f"+sweeps={study}", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tail: list[str] = []
    with subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as child:
        assert child.stdout is not None
        for line in child.stdout:
            print(line, end="", flush=True)
            tail = [*tail[-49:], line.rstrip("\n")]
    if child.returncode == 0:
        return
    errors = [line[len("error: ") :] for line in tail if line.startswith("error: ")]
    if errors:
        raise UserError(errors[-1])
    raise RuntimeError(f"the sweep exited with status {child.returncode}:\n" + "\n".join(tail[-20:]))


def _read_sweep(cfg: DictConfig, sweeper: DictConfig, study: str) -> SweepResult:
    """The finished study and its MLflow parent run."""
    import mlflow
    import optuna

    from bloodcell.sweep.trial import open_storage, resolve_storage_url
    from bloodcell.tracking import resolve_tracking_uri

    # the sweeper's own rule for the study's name (its config: null = the chosen sweeps file's name)
    name = str(sweeper.study_name or study)
    storage = resolve_storage_url(sweeper.storage)
    loaded = optuna.load_study(study_name=name, storage=open_storage(storage))
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    parent = loaded.user_attrs.get("mlflow_parent_run_id")  # the sweeper's PARENT_RUN_ATTR
    experiment_id = mlflow.MlflowClient(tracking_uri).get_run(parent).info.experiment_id if parent else None
    completed = [t for t in loaded.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return SweepResult(
        study_name=name,
        storage=storage,
        best_value=loaded.best_value if completed else None,
        best_params=dict(loaded.best_params) if completed else {},
        parent_run_id=parent,
        experiment_id=experiment_id,
        tracking_uri=tracking_uri,
        trials=loaded.trials_dataframe(),
        config=cfg,
        _study=loaded,
    )
