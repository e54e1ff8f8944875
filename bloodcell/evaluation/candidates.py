"""The models a comparison, an ensemble or a distillation names: run ids, registry URIs or a sweep's best
trials, resolved to MLflow runs with their tags and a letter each (A is the reference).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bloodcell.core.errors import UserError

if TYPE_CHECKING:
    pass
log = logging.getLogger("bloodcell.compare")


@dataclass
class Candidate:
    """One model to compare: the training run it came from, and how the user named it."""

    spec: str
    run: Any  # mlflow.entities.Run
    experiment: str
    name: str = ""  # A, B, ... in the order given

    @property
    def run_id(self) -> str:
        return str(self.run.info.run_id)

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.run.data.tags)

    @property
    def data_fingerprint(self) -> str:
        """The data the splits were cut from: the cleaned set's when the run cleaned its data."""
        return self.tags.get("data_fingerprint_cleaned") or self.tags.get("data_fingerprint", "")

    @property
    def split_fingerprint(self) -> str:
        return self.tags.get("split_fingerprint", "")

    @property
    def split_seed(self) -> str:
        """The seed its split was cut with: ``data.split_seed`` (a fixed default since issue 27), or, for a
        run that left it null (and runs from before it existed), its ``seed``."""
        params = self.run.data.params
        split_seed = params.get("data.split_seed", "None")
        return split_seed if split_seed not in ("None", "") else params.get("seed", "?")

    @property
    def model_uri(self) -> str:
        return self.tags.get("model_uri") or f"runs:/{self.run_id}/model"

    def describe(self) -> str:
        """Where the model came from, for people: run, experiment, data, split seed."""
        source = self.tags.get("data_source", "?")
        return (
            f"run {self.run_id[:8]} (experiment '{self.experiment}', data {source}, "
            f"fingerprint {self.data_fingerprint[:12] or '?'}, split seed {self.split_seed})"
        )


def resolve_run(client: Any, spec: str) -> Any:
    """The training run behind a run id, ``runs:/<id>/...``, ``models:/<name>@<alias>``,
    ``models:/<name>/<version>`` or ``models:/<logged model id>``."""
    from mlflow.exceptions import MlflowException

    spec = str(spec).strip()
    run_id: str | None
    try:
        if spec.startswith("runs:/"):
            run_id = spec[len("runs:/") :].split("/", 1)[0]
        elif spec.startswith("models:/"):
            ref = spec[len("models:/") :].strip("/")
            if ref.startswith("m-") and "/" not in ref and "@" not in ref:
                run_id = client.get_logged_model(ref).source_run_id
            elif "@" in ref:
                name, alias = ref.split("@", 1)
                run_id = client.get_model_version_by_alias(name, alias).run_id
            else:
                name, version = ref.rsplit("/", 1)
                run_id = client.get_model_version(name, version).run_id
        else:
            run_id = spec
        if not run_id:
            raise UserError(f"{spec} names no training run (a model registered from outside bloodcell?)")
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(
            f"{spec!r} is not a run id, runs:/<id> or models:/<name>@<alias> | /<version> in this tracking "
            "store (check it, or tracking.uri)"
        ) from None


def sweep_top(client: Any, parent_id: str, top: int) -> list[Any]:
    """The ``top`` best FINISHED trial runs of a sweep, best first, by the sweep's objective."""
    from mlflow.exceptions import MlflowException

    try:
        parent = client.get_run(parent_id)
    except MlflowException:
        raise UserError(f"sweep={parent_id!r} is not a run id in this tracking store") from None
    objective = parent.data.params.get("objective", "val_accuracy")
    metric = f"best_{objective}"
    lower = parent.data.params.get("direction", "maximize") == "minimize"
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'",
        max_results=5000,
    )
    # an ensemble logged under the sweep (bloodcell.ensemble) is made of trials, it is not one
    scored = [r for r in runs if metric in r.data.metrics and "bloodcell.ensemble" not in r.data.tags]
    if len(scored) < 2:
        raise UserError(f"sweep {parent_id} has {len(scored)} FINISHED trial(s) with {metric}; 2 are needed")
    scored.sort(key=lambda r: r.data.metrics[metric], reverse=not lower)
    return scored[: max(int(top), 2)]


def run_specs(value: Any) -> list[str]:
    """A command's ``runs`` as given: a list, or one string of comma-separated ids (None: none)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [s for s in (part.strip() for part in value.split(",")) if s]
    return [str(v) for v in value]


def candidates(
    client: Any, specs: list[str], sweep: str | None = None, top: int = 4, command: str = "compare"
) -> list[Candidate]:
    runs = [(spec, resolve_run(client, spec)) for spec in specs]
    if sweep:
        runs += [(f"trial {r.data.tags.get('trial_number', '?')}", r) for r in sweep_top(client, sweep, top)]
    if len(runs) < 2:
        raise UserError(
            f"{command} needs two models at least: runs=[<run id>,<run id>] (run ids, runs:/..., "
            "models:/...), or sweep=<parent run id> top=<k>"
        )
    experiments: dict[str, str] = {}
    out = []
    for i, (spec, run) in enumerate(runs):
        eid = run.info.experiment_id
        if eid not in experiments:
            experiments[eid] = client.get_experiment(eid).name
        out.append(
            Candidate(spec, run, experiments[eid], LETTERS[i % len(LETTERS)] * (1 + i // len(LETTERS)))
        )
    return out


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
