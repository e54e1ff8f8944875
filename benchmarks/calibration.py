"""Temperature scaling and abstention measured on runs already trained, from their stored predictions: the
temperature fitted on each run's validation split, the test split's expected calibration error (ECE) and
negative log-likelihood before and after, and the share of test images kept at 95% / 99% accuracy.

    python benchmarks/calibration.py                                   # every run of the project's store
    python benchmarks/calibration.py --store sqlite:///benchmarks/results/selection_noise/mlflow.db

Nothing is trained or predicted again: each run's ``predictions/val.npz`` and ``predictions/test.npz`` hold
the final model's probabilities. Runs trained with ``trainer.calibrate`` stored calibrated probabilities
already (their temperature is then refitted near 1); the figures that mean something come from runs
trained before it.
"""

from __future__ import annotations

import argparse

import numpy as np


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    return float(-np.log(picked).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="MLflow tracking URI; default: the project's mlruns/mlflow.db")
    args = ap.parse_args()

    import mlflow
    from omegaconf import OmegaConf

    from bloodcell.evaluation.abstention import abstention_metrics
    from bloodcell.evaluation.calibration import (
        apply_temperature,
        expected_calibration_error,
        fit_temperature,
    )
    from bloodcell.tracking import resolve_tracking_uri

    uri = args.store or resolve_tracking_uri(OmegaConf.create({"uri": None}))
    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "attributes.status = 'FINISHED'")
    header = (
        f"{'run':<10} {'name':<14} {'n test':>6} {'acc':>6} {'T':>5} {'ECE before':>10} {'ECE after':>9} "
        f"{'NLL before':>10} {'NLL after':>9} {'cov@95 b/a':>11} {'cov@99 b/a':>11}"
    )
    print(f"store {uri}\n{header}")
    rows = []
    for run in runs:
        try:
            val = np.load(mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/predictions/val.npz"))
            test = np.load(
                mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/predictions/test.npz")
            )
        except Exception:  # a run without stored predictions (older, or a sweep parent)
            continue
        temperature = fit_temperature(val["probabilities"], val["labels"])
        before, labels = test["probabilities"].astype(np.float64), test["labels"]
        after = apply_temperature(before, temperature)
        cover_before, cover_after = abstention_metrics(before, labels), abstention_metrics(after, labels)
        row = (
            expected_calibration_error(before, labels),
            expected_calibration_error(after, labels),
            negative_log_likelihood(before, labels),
            negative_log_likelihood(after, labels),
        )
        rows.append(row)
        c95 = "abstention/coverage_at_95_accuracy"
        c99 = "abstention/coverage_at_99_accuracy"
        print(
            f"{run.info.run_id[:8]:<10} {run.info.run_name[:14]:<14} {len(labels):>6} "
            f"{(before.argmax(1) == labels).mean():>6.4f} {temperature:>5.2f} {row[0]:>10.4f} {row[1]:>9.4f} "
            f"{row[2]:>10.4f} {row[3]:>9.4f} "
            f"{cover_before[c95]:>5.3f}/{cover_after[c95]:<5.3f} "
            f"{cover_before[c99]:>5.3f}/{cover_after[c99]:<5.3f}"
        )
    if rows:
        mean = np.mean(rows, axis=0)
        print(
            f"mean over {len(rows)} runs: test ECE {mean[0]:.4f} -> {mean[1]:.4f}, "
            f"test NLL {mean[2]:.4f} -> {mean[3]:.4f}"
        )


if __name__ == "__main__":
    main()
