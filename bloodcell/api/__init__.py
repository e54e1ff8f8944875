"""bloodcell from Python (a notebook, a script): the commands as functions over the same library, taking
the same Hydra override strings and returning objects that show themselves in Jupyter.

    from bloodcell import api

    run = api.train("+experiment=quickstart")                     # RunResult: run id, metrics, model URI
    study = api.sweep("quick", "hydra.sweeper.n_trials=4")        # SweepResult: best trial, trials, plots
    api.runs("quickstart")                                        # the MLflow runs table (pandas)
    api.compare(study)                                            # its best trials, image by image
    api.ensemble(study, "top=3")                                  # RunResult of the ensemble's run
    champion = api.promote("experiment=quickstart")               # PromotionResult
    api.predict(champion, images)                                 # (N, 8) probabilities
    api.explain(champion, images, labels=labels)                  # Grad-CAM sheets, inline

Bad input raises `UserError` with the one line the command prints after ``error:``; any function may be
called again in the same process, also after an error. What each function does: docs/api.md.
"""

from bloodcell.api.commands import compare, ensemble, explain, predict, promote, runs, sweep, train
from bloodcell.api.results import (
    ComparisonResult,
    Explanation,
    Picture,
    PromotionResult,
    RunResult,
    SweepResult,
)
from bloodcell.core.errors import UserError

__all__ = [
    "ComparisonResult",
    "Explanation",
    "Picture",
    "PromotionResult",
    "RunResult",
    "SweepResult",
    "UserError",
    "compare",
    "ensemble",
    "explain",
    "predict",
    "promote",
    "runs",
    "sweep",
    "train",
]
