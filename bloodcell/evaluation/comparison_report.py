"""How a comparison of runs is shown and kept: the contact sheet of the images only one model gets right, and
the comparison logged as an MLflow run of its own (`log_comparison`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bloodcell import CLASS_NAMES
from bloodcell.evaluation.comparison import Comparison, PairComparison

if TYPE_CHECKING:
    pass
log = logging.getLogger("bloodcell.compare")


def disagreement_sheet(
    images: np.ndarray,
    labels: np.ndarray,
    predicted_a: np.ndarray,
    predicted_b: np.ndarray,
    pair: PairComparison,
    path: Path,
    limit: int = 48,
    columns: int = 12,
) -> Path:
    """A PNG of the images one model gets right and the other wrong: two blocks, each tile captioned with
    the true class and the wrong model's answer."""
    from PIL import Image, ImageDraw

    tile, caption, header = 72, 24, 18
    blocks = [
        (f"only {pair.b} right ({len(pair.only_b)}; {pair.a} said ...)", pair.only_b[:limit], predicted_a),
        (f"only {pair.a} right ({len(pair.only_a)}; {pair.b} said ...)", pair.only_a[:limit], predicted_b),
    ]
    height = sum(header + max(1, -(-len(rows) // columns)) * (tile + caption) for _, rows, _ in blocks)
    sheet = Image.new("RGB", (columns * tile, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for title, rows, wrong in blocks:
        draw.text((4, y + 3), title, fill=(0, 0, 0))
        y += header
        for k, row in enumerate(rows):
            r, c = divmod(k, columns)
            x0, y0 = c * tile, y + r * (tile + caption)
            sheet.paste(Image.fromarray(images[row]).resize((tile, tile), Image.Resampling.NEAREST), (x0, y0))
            draw.text((x0 + 2, y0 + tile), CLASS_NAMES[labels[row]][:11], fill=(0, 120, 0))
            draw.text((x0 + 2, y0 + tile + 11), CLASS_NAMES[wrong[row]][:11], fill=(200, 0, 0))
        y += max(1, -(-len(rows) // columns)) * (tile + caption)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def log_comparison(client: Any, experiment: str, comparison: Comparison, params: dict[str, Any]) -> str:
    """The comparison as an MLflow run of its own: figures as metrics, the table, a JSON and the sheets."""
    from bloodcell.tracking import artifact_location, record_to

    found = client.get_experiment_by_name(experiment)
    eid = (
        found.experiment_id
        if found is not None
        else client.create_experiment(experiment, artifact_location=artifact_location(client.tracking_uri))
    )
    names = "-".join(m.run_id[:6] for m in comparison.models)
    run = client.create_run(eid, run_name=f"compare-{names}", tags={"bloodcell.compare": "true"})
    metrics: dict[str, float] = {}
    for m, s in zip(comparison.models, comparison.scores):
        metrics.update(s.metrics(f"{m.name}_"))
    for p in comparison.pairs:
        metrics.update(p.metrics())
    tags = {
        f"compare.{m.name}": f"{m.run_id} ({m.spec}, experiment {m.experiment})" for m in comparison.models
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "comparison.txt").write_text(comparison.text() + "\n")
        (folder / "comparison.json").write_text(json.dumps(comparison.as_dict(), indent=2))
        artifacts: list[tuple[Path, str | None]] = [
            (folder / "comparison.txt", None),
            (folder / "comparison.json", None),
        ]
        if comparison.images is not None:
            for pair, predicted in zip(comparison.pairs, comparison.predicted[1:]):
                path = folder / f"disagreements_{pair.b}_vs_{pair.a}.png"
                disagreement_sheet(
                    comparison.images, comparison.labels, comparison.predicted[0], predicted, pair, path
                )
                artifacts.append((path, "plots"))
        record_to(
            run.info.run_id,
            params={k: str(v)[:6000] for k, v in params.items()},
            tags=tags,
            metrics=metrics,
            artifacts=artifacts,
            status="FINISHED",
        )
    return str(run.info.run_id)


@dataclass
class ComparedRuns:
    """A comparison as the compare config asked for it, and the run it was logged as ("" without ``log``)."""

    comparison: Comparison
    run_id: str
    tracking_uri: str


def compare_configured(cfg: Any) -> ComparedRuns:
    """What ``python -m bloodcell.compare`` does with its composed config (conf/compare.yaml), less the
    printing: resolve the models, compare them, log the comparison as a run when ``log``."""
    import mlflow

    from bloodcell.evaluation.candidates import candidates, run_specs
    from bloodcell.evaluation.comparison import run_comparison
    from bloodcell.serving.loading import set_tracking

    set_tracking(cfg.tracking)
    client = mlflow.MlflowClient()
    models = candidates(client, run_specs(cfg.runs), cfg.sweep, int(cfg.top))
    comparison = run_comparison(
        client,
        models,
        split=str(cfg.split),
        eval_path=cfg.eval,
        allow_different=bool(cfg.allow_different),
        sheet=bool(cfg.contact_sheet),
    )
    run_id = ""
    if cfg.log:
        params = {"split": cfg.split, "eval": cfg.eval, "runs": [m.run_id for m in models]}
        run_id = log_comparison(client, cfg.tracking.experiment, comparison, params)
    return ComparedRuns(comparison, run_id, mlflow.get_tracking_uri())
