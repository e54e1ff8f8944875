"""`python -m bloodcell.promote`: the best finished run -> a registered model version -> maybe the alias.

    python -m bloodcell.promote experiment=effnetb2                       # best of all runs
    python -m bloodcell.promote experiment=effnetb2 sweep=<parent run id> # best trial of one sweep
    python -m bloodcell.promote experiment=effnetb2 eval=held_out.npz     # the gate judges on these images
    python -m bloodcell.promote experiment=effnetb2 gate=metric           # the plain "higher metric" rule
    python -m bloodcell.promote experiment=effnetb2 force=true            # move the alias regardless
    python -m bloodcell.promote run=<run id>                              # that run (an ensemble's, say)

Steps: rank the experiment's FINISHED runs that logged a model by ``metric`` -> register the winner's
logged model as a new version of ``model_name`` (the name the run was trained for: ``bloodcell``, or
``bloodcell-demo`` for the synthetic-data demo preset; or reuse the version already made from that run) ->
move ``alias`` to it only when the gate lets it (or ``force``):

* ``gate=mcnemar`` (default): on the same evaluation images (the test images both runs held out, the
  challenger's test split, or ``eval=<npz>``) McNemar's exact test must say the challenger is better at
  ``gate.alpha`` and no class's recall may fall by more than ``gate.max_class_drop``; a holder that cannot
  even take the challenger's images loses;
* ``gate=metric``: the challenger's ``metric`` beats the holder's, by any margin.

Every decision is written on the challenger's model version as ``gate.*`` tags. Everything the user can
get wrong is checked before the registry is touched.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from bloodcell import PROJECT_ROOT
from bloodcell.core.cli import exit_now, run_or_exit
from bloodcell.serving.promotion import Promotion, expand_experiment_shorthand, promote_configured


def main_task(cfg: DictConfig) -> Promotion:
    settings, result = promote_configured(cfg)  # the library's, as bloodcell.api.promote calls it
    label = f"{result.model_name}@{settings.alias}"
    verb = "registered as" if result.created else "is already"
    print(
        f"best run {result.run_id}: {settings.metric}={result.value:.4f}, {verb} version {result.version} "
        f"of '{result.model_name}'"
    )
    if result.details:
        print(result.details)
    if result.alias_moved:
        print(f"{label} -> version {result.version}: {result.reason}")
    else:
        print(f"{label} unchanged: {result.reason}")
    return result


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="promote")
def main(cfg: DictConfig) -> None:
    run_or_exit(main_task, cfg)


if __name__ == "__main__":
    sys.argv = expand_experiment_shorthand(sys.argv)
    main()
    exit_now()  # done: skip the interpreter's teardown
