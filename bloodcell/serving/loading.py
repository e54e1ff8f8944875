"""A model from anywhere: a registry URI (``models:/name@alias``, ``models:/name/version``), a logged model
(``models:/m-...``), a run's model (``runs:/<id>/model``), an MLflow model folder or a ``.keras`` file,
loaded with Keras' safe mode on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloodcell.core.errors import UserError

if TYPE_CHECKING:
    import keras


def resolve_model_uri(spec: str, client: Any = None, tracking_uri: str | None = None) -> str:
    """Check that ``spec`` names an existing model and return a URI/path MLflow or Keras can load.

    Registry names, aliases, versions and run ids are looked up first so that a typo is one clear line
    instead of an MLflow stack trace: in ``client``'s store, else ``tracking_uri``'s, else MLflow's
    current one."""
    if not spec:
        raise UserError(
            "say which model: model=models:/<name>@<alias> | models:/<name>/<version> | "
            "runs:/<run id>/model | <path to .keras file or MLflow model folder>"
        )
    spec = str(spec)
    if spec.startswith("models:/"):
        import mlflow
        from mlflow.exceptions import MlflowException

        client = client or mlflow.MlflowClient(tracking_uri)
        ref = spec[len("models:/") :].strip("/")
        if ref.startswith("m-") and "/" not in ref and "@" not in ref:  # a logged model id
            try:
                client.get_logged_model(ref)
            except MlflowException:
                raise UserError(
                    f"logged model {ref} not found in this tracking store; check the id "
                    "(tag model_uri of the run) or tracking.uri"
                ) from None
            return spec
        name, sep_alias, alias = ref.partition("@")
        name, _, version = name.partition("/") if not sep_alias else (name, "", "")
        try:
            client.get_registered_model(name)
        except MlflowException:
            known = ", ".join(sorted(m.name for m in client.search_registered_models())) or "none"
            raise UserError(
                f"registered model {name!r} not found (registered: {known}); "
                "promote a run first: python -m bloodcell.promote experiment=<name>"
            ) from None
        try:
            if sep_alias:
                client.get_model_version_by_alias(name, alias)
            elif version and version != "latest":
                client.get_model_version(name, version)
        except MlflowException:
            what = f"alias {alias!r}" if sep_alias else f"version {version!r}"
            aliases = sorted(client.get_registered_model(name).aliases or {})
            raise UserError(
                f"registered model {name!r} has no {what} (aliases: {', '.join(aliases) or 'none'}); "
                f"use models:/{name}@<alias> or models:/{name}/<version>"
            ) from None
        return spec
    if spec.startswith("runs:/"):
        import mlflow
        from mlflow.exceptions import MlflowException

        client = client or mlflow.MlflowClient(tracking_uri)
        run_id = spec[len("runs:/") :].split("/", 1)[0]
        try:
            client.get_run(run_id)
        except MlflowException:
            raise UserError(
                f"run {run_id!r} not found in this tracking store; check the run id or tracking.uri"
            ) from None
        return spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"model {spec!r} is neither an existing file/folder nor a models:/ or runs:/ URI; "
            "e.g. model=models:/bloodcell@champion"
        )
    if path.is_file() and path.suffix not in (".keras", ".h5"):
        raise UserError(f"model file {path} is not a Keras model (.keras or .h5)")
    if path.is_dir() and not (path / "MLmodel").is_file():
        raise UserError(
            f"model folder {path} has no MLmodel file; point to an MLflow model folder or a .keras file"
        )
    return str(path.resolve())


def set_tracking(tracking_cfg: Any) -> None:
    """Point MLflow at the configured store (without creating an experiment: reading only)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # model files are small, local

    from bloodcell.tracking import connect

    connect(tracking_cfg)


def load_model(spec: str, tracking_uri: str | None = None) -> keras.Model:
    """A Keras model from a registry/run URI, an MLflow model folder or a .keras/.h5 file. A file Keras
    refuses (code that safe mode will not run, a damaged archive, not a model) is one UserError line.
    ``tracking_uri``: the store a models:/ or runs:/ URI is looked up in, instead of MLflow's current one
    (which stays as it is)."""
    import zipfile

    uri = resolve_model_uri(spec, tracking_uri=tracking_uri)
    # Keras finds a layer of a saved model only when its class is registered: calibrated models logged before
    # issue 27 end with this one (newer models hold standard Keras layers only)
    from bloodcell.serving.submission_template import TemperatureScaling  # noqa: F401

    try:
        if Path(uri).is_file():
            import keras

            return keras.saving.load_model(uri, compile=False)
        import mlflow.keras

        if tracking_uri and uri.startswith(("models:/", "runs:/")):
            uri = _download(uri, tracking_uri)
        return mlflow.keras.load_model(uri)
    except (ValueError, TypeError, OSError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "safe_mode" in str(err):
            raise UserError(
                f"model {spec} holds Python code (a Lambda layer or a custom function) that Keras' safe mode "
                "refuses to load; bloodcell models have none: re-save it without that layer, or use a model "
                "logged by bloodcell.train"
            ) from None
        raise UserError(
            f"model {spec} cannot be loaded as a Keras model ({type(err).__name__}: {first})"
        ) from None


def _download(uri: str, tracking_uri: str) -> str:
    """A local copy of the models:/ or runs:/ model ``uri`` of the store at ``tracking_uri``. MLflow
    resolves a models:/ URI (and a run's logged model) in its current store only, so a client of this
    store is asked where the files are."""
    import mlflow
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = mlflow.MlflowClient(tracking_uri)
    if uri.startswith("models:/"):
        found = get_model_name_and_version(client, uri)
        if len(found) == 1:  # a logged model's id
            uri = client.get_logged_model(found[0]).artifact_location
        else:
            uri = client.get_model_version_download_uri(*found)
    else:  # runs:/<run id>/<name>: the run's logged model of that name, or (older runs) its artifacts
        run_id, _, name = uri[len("runs:/") :].partition("/")
        run = client.get_run(run_id)
        query = f"source_run_id = '{run_id}' AND name = '{name.strip('/')}'"
        logged = client.search_logged_models([run.info.experiment_id], filter_string=query, max_results=1)
        if logged:
            uri = logged[0].artifact_location
    return mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)


def model_image_shape(model: Any) -> tuple[int | None, int | None, int]:
    shape = model.input_shape
    if isinstance(shape, list):
        shape = shape[0]
    return tuple(shape[1:])


def resize_for(model: Any, images: Any) -> tuple[int, int] | None:
    """The (height, width) ``images`` must be resized to before ``model`` takes them, or None when they
    already fit (or the model takes any size): predict's and the notebook API's one rule, which the
    submission bundle's ``model.py`` follows too."""
    height, width, _ = model_image_shape(model)
    if height and width and tuple(images.shape[1:3]) != (height, width):
        return int(height), int(width)
    return None
