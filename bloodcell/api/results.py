"""What the API functions return, and how it shows itself in Jupyter: a short HTML table with the MLflow
link (``_repr_html_``), and the figures as inline pictures (``_repr_png_``).

Figures travel as PNG bytes (`Picture`), not as live Matplotlib figures: a notebook shows them whatever
Matplotlib backend the library switched to (its sheets draw on Agg), and a figure closed after drawing
never shows up twice, once from the result and once from pyplot's list of open figures."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure
    from omegaconf import DictConfig

    from bloodcell.evaluation.comparison import Comparison
    from bloodcell.serving.promotion import Promotion

#: the metrics a run's table shows (every logged metric is in ``RunResult.metrics``), with their intervals
SHOWN_METRICS = ("best_val_accuracy", "test_accuracy", "test_macro_f1")


@dataclass(frozen=True)
class Picture:
    """A PNG image that Jupyter shows inline; ``save(path)`` writes it."""

    png: bytes
    title: str = ""

    @classmethod
    def of(cls, figure: Figure, title: str = "") -> Picture:
        """A Matplotlib figure drawn once to PNG, then closed (removed from pyplot's open figures)."""
        import matplotlib.pyplot as plt

        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight")
        plt.close(figure)
        return cls(buffer.getvalue(), title)

    def _repr_png_(self) -> bytes:
        return self.png

    def html(self) -> str:
        data = base64.b64encode(self.png).decode("ascii")
        caption = f"<figcaption>{html.escape(self.title)}</figcaption>" if self.title else ""
        return f'<figure><img src="data:image/png;base64,{data}" style="max-width:100%"/>{caption}</figure>'

    def save(self, path: str) -> None:
        with open(path, "wb") as out:
            out.write(self.png)


def _table(rows: list[tuple[str, str]], link: str | None = None) -> str:
    """Rows of (name, value as HTML) and the MLflow link as the last row."""
    if link:
        rows = [*rows, ("MLflow", f'<a href="{html.escape(link)}" target="_blank">{html.escape(link)}</a>')]
    body = "".join(
        f'<tr><th style="text-align:left">{html.escape(k)}</th><td style="text-align:left">{v}</td></tr>'
        for k, v in rows
    )
    return f"<table>{body}</table>"


def _metric(metrics: dict[str, float], name: str) -> str:
    from bloodcell.evaluation.stats import interval_names

    low, high = (metrics.get(n) for n in interval_names(name))
    interval = f" (95% interval {low:.4f}-{high:.4f})" if low is not None and high is not None else ""
    return f"{metrics[name]:.4f}{interval}"


@dataclass
class RunResult:
    """One MLflow run made by `bloodcell.api.train` or `bloodcell.api.ensemble`.

    ``metrics`` holds every final metric the run logged (``test_accuracy``, its interval
    ``test_accuracy_ci_low``/``_ci_high``, ``test_macro_f1``, per-class recall, ...); ``model_uri`` is what
    `predict`, `explain`, `compare` and `submit` take; ``config`` is the composed config it ran with.
    """

    run_id: str
    experiment_id: str
    tracking_uri: str
    status: str
    run_name: str
    metrics: dict[str, float]
    model_uri: str | None
    config: DictConfig | None = None

    @classmethod
    def of(cls, run_id: str, tracking_uri: str, config: DictConfig | None = None) -> RunResult:
        import mlflow

        run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
        model_uri = run.data.tags.get("model_uri")
        return cls(
            run_id=run_id,
            experiment_id=run.info.experiment_id,
            tracking_uri=tracking_uri,
            status=run.info.status,
            run_name=run.info.run_name or "",
            metrics=dict(run.data.metrics),
            model_uri=model_uri,
            config=config,
        )

    @property
    def link(self) -> str:
        """The run's page in the MLflow UI (`mlflow ui` serves a local store at 127.0.0.1:5000)."""
        from bloodcell.tracking import ui_url

        return ui_url(self.experiment_id, self.run_id, self.tracking_uri)

    def plot(self, name: str = "confusion_matrix") -> Picture | None:
        """A figure the run logged under ``plots/`` (confusion_matrix, training_curves, reliability,
        accuracy_coverage, gradcam, test_errors), or None when it has none of that name."""
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=self.run_id, artifact_path=f"plots/{name}.png", tracking_uri=self.tracking_uri
            )
        except (MlflowException, OSError):
            return None
        with open(path, "rb") as image:
            return Picture(image.read(), name.replace("_", " "))

    def _repr_html_(self) -> str:
        rows = [("run", html.escape(f"{self.run_id} ({self.run_name}, {self.status})"))]
        rows += [(name, _metric(self.metrics, name)) for name in SHOWN_METRICS if name in self.metrics]
        rows.append(("model", html.escape(self.model_uri or "not logged")))
        confusion = self.plot("confusion_matrix")
        return _table(rows, self.link) + (confusion.html() if confusion else "")


@dataclass
class SweepResult:
    """An Optuna study run as a Hydra multirun by `bloodcell.api.sweep`: its best trial, the sweep's MLflow
    parent run, and every trial as a DataFrame (``trials``: Optuna's ``trials_dataframe()``)."""

    study_name: str
    storage: str
    best_value: float | None
    best_params: dict[str, Any]
    parent_run_id: str | None
    experiment_id: str | None
    tracking_uri: str
    trials: pd.DataFrame
    config: DictConfig | None = None
    _study: Any = field(default=None, repr=False)

    @property
    def study(self) -> Any:  # optuna.Study
        """The Optuna study, loaded from its storage (for Optuna's own functions)."""
        if self._study is None:
            import optuna

            from bloodcell.sweep.trial import open_storage

            self._study = optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage))
        return self._study

    @property
    def link(self) -> str | None:
        """The parent run's page in the MLflow UI (its trials are nested under it)."""
        if not (self.parent_run_id and self.experiment_id):
            return None
        from bloodcell.tracking import ui_url

        return ui_url(self.experiment_id, self.parent_run_id, self.tracking_uri)

    def history(self) -> Picture:
        """Optuna's optimization history (the objective of every trial and the best so far)."""
        from optuna.visualization.matplotlib import plot_optimization_history

        return Picture.of(_quietly(plot_optimization_history, self.study).figure, "optimization history")

    def importance(self) -> Picture | None:
        """Optuna's hyperparameter importances (fANOVA on the completed trials), or None when the study
        has too few completed trials, or no parameter that varied, to say anything."""
        from optuna.visualization.matplotlib import plot_param_importances

        try:
            axes = _quietly(plot_param_importances, self.study)
        except (ValueError, RuntimeError):
            return None
        return Picture.of(axes.figure, "parameter importance")

    def _repr_html_(self) -> str:
        states = self.trials["state"].value_counts().to_dict() if "state" in self.trials else {}
        value = "none completed" if self.best_value is None else f"{self.best_value:.4f}"
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.best_params.items()
        )
        rows = [
            ("study", html.escape(f"{self.study_name} ({self.storage})")),
            ("trials", html.escape(", ".join(f"{n} {s.lower()}" for s, n in states.items()) or "none")),
            ("best value", value),
            ("best params", html.escape(params or "-")),
            ("parent run", html.escape(self.parent_run_id or "-")),
        ]
        pictures = [self.history(), self.importance()] if self.best_value is not None else []
        return _table(rows, self.link) + "".join(p.html() for p in pictures if p is not None)


@dataclass
class ComparisonResult:
    """`bloodcell.api.compare`'s result: the library's `Comparison` (scores, pairs, ``text()``) and the run
    it was logged as (None with ``log=false``)."""

    comparison: Comparison
    run_id: str | None
    experiment_id: str | None
    tracking_uri: str

    @property
    def link(self) -> str | None:
        if not (self.run_id and self.experiment_id):
            return None
        from bloodcell.tracking import ui_url

        return ui_url(self.experiment_id, self.run_id, self.tracking_uri)

    def text(self) -> str:
        return self.comparison.text()

    def _repr_html_(self) -> str:
        models = [(m.name, html.escape(f"{m.spec}: {m.describe()}")) for m in self.comparison.models]
        return _table(models, self.link) + f"<pre>{html.escape(self.text())}</pre>"


@dataclass
class PromotionResult:
    """`bloodcell.api.promote`'s result: the library's `Promotion` (version, whether the alias moved and
    why) with the registry URI of the version."""

    promotion: Promotion
    alias: str
    tracking_uri: str

    @property
    def model_uri(self) -> str:
        """The alias when it points at this version now, else the version itself."""
        p = self.promotion
        if p.alias_moved:
            return f"models:/{p.model_name}@{self.alias}"
        return f"models:/{p.model_name}/{p.version}"

    def _repr_html_(self) -> str:
        p = self.promotion
        moved = "moved to it" if p.alias_moved else "unchanged"
        rows = [
            ("run", html.escape(f"{p.run_id} ({p.value:.4f})")),
            ("version", html.escape(f"{p.model_name} version {p.version}" + (" (new)" if p.created else ""))),
            (f"@{html.escape(self.alias)}", html.escape(f"{moved}: {p.reason}")),
            ("model", html.escape(self.model_uri)),
        ]
        details = f"<pre>{html.escape(p.details)}</pre>" if p.details else ""
        return _table(rows) + details


@dataclass
class Explanation:
    """`bloodcell.api.explain`'s sheets as pictures: ``gradcam`` always, ``errors`` for labelled images;
    ``probabilities`` (N, 8) of the images explained."""

    gradcam: Picture
    errors: Picture | None
    layer: str
    probabilities: Any  # np.ndarray

    def _repr_html_(self) -> str:
        return "".join(p.html() for p in (self.gradcam, self.errors) if p is not None)


def _quietly(plot: Any, study: Any) -> Any:
    """Optuna's Matplotlib plots warn that they are experimental, once per call."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plot(study)
