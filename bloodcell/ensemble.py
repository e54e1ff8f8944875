"""`python -m bloodcell.ensemble`: several trained runs as one model that averages their class probabilities,
evaluated and logged as a run of its own, which promote, predict and submit take like any other.

    python -m bloodcell.ensemble sweep=<parent run id> top=3                   # a sweep's 3 best trials
    python -m bloodcell.ensemble sweep=<parent run id> top=10 selection=greedy size=5
    python -m bloodcell.ensemble runs=[<run id>,<run id>,<run id>]

The model is one Keras model: one input of the members' image shape -> each member's logged model (with
its own resizing and preprocessing, so members of other backbones and input sizes mix) ->
``keras.layers.Average``. A member picked twice (greedy selection picks with replacement) feeds the average
twice: its weight is how often it was picked. With ``calibrate`` (default) a temperature fitted on the
ensemble's validation probabilities follows the average, as after training (bloodcell.evaluation.calibration).

Members must share one data set and split (tags ``data_fingerprint``, ``split_fingerprint``): the ensemble
is evaluated on their common test split, which none of them trained on, and greedy selection reads their
stored validation predictions (``predictions/val.npz``), so no member runs again to be selected. The
validation split chose the members (and each member's epochs): the test split is what says how good the
ensemble is.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bloodcell import PROJECT_ROOT
from bloodcell.core.cli import exit_now, run_or_exit
from bloodcell.evaluation.ensemble import Ensemble, make_ensemble
from bloodcell.evaluation.stats import interval_names


def summary(ensemble: Ensemble, experiment: str) -> str:
    result = ensemble.result
    count, votes = len(ensemble.members), sum(ensemble.weights)
    lines = [f"ensemble of {count} run{'s' * (count != 1)} ({votes} vote{'s' * (votes != 1)}):"]
    lines += [
        f"  {m.run_id}  weight {w}  experiment '{m.experiment}'  "
        f"best_val_accuracy {m.run.data.metrics.get('best_val_accuracy', float('nan')):.4f}  "
        f"test_accuracy {m.run.data.metrics.get('test_accuracy', float('nan')):.4f}"
        for m, w in zip(ensemble.members, ensemble.weights)
    ]
    test, val = result.evaluation.metrics, result.val.evaluation.metrics
    low, high = (test[name] for name in interval_names("test_accuracy"))
    lines.append(
        f"validation accuracy {val['final_val_accuracy']:.4f}; test accuracy {test['test_accuracy']:.4f} "
        f"(95% interval {low:.4f}-{high:.4f}), "
        f"macro-F1 {test['test_macro_f1']:.4f} on {len(result.probabilities)} test images"
        + (f"; temperature {result.temperature:.3f}" if result.temperature is not None else "")
    )
    if result.tta is not None and result.val_tta is not None:
        tta, val_tta = result.tta.metrics, result.val_tta.metrics
        low, high = (tta[name] for name in interval_names("test_tta_accuracy"))
        lines.append(
            f"with test-time augmentation: validation accuracy {val_tta['final_val_tta_accuracy']:.4f}; "
            f"test accuracy {tta['test_tta_accuracy']:.4f} (95% interval {low:.4f}-{high:.4f})"
        )
    if ensemble.run_id:
        lines.append(
            f"logged as run {ensemble.run_id} in experiment '{experiment}': model "
            f"runs:/{ensemble.run_id}/model (python -m bloodcell.promote run={ensemble.run_id})"
        )
    return "\n".join(lines)


def main_task(cfg: DictConfig) -> Ensemble:
    ensemble = make_ensemble(cfg)  # the library's, as bloodcell.api.ensemble calls it
    assert ensemble.config is not None
    print(summary(ensemble, ensemble.config.tracking.experiment))
    return ensemble


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="ensemble")
def main(cfg: DictConfig) -> None:
    run_or_exit(main_task, cfg)


if __name__ == "__main__":
    main()
    exit_now()  # done: skip the interpreter's teardown
