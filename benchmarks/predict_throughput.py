"""Inference throughput of `bloodcell.predict` (images per second) on the held-out test split, with and
without test-time augmentation, and the held-out accuracy each gives.

    python benchmarks/predict_throughput.py                           # best mobilenet_cpu run in mlruns/
    python benchmarks/predict_throughput.py --model models:/bloodcell@champion

The test split is rebuilt exactly as training made it (same data file, fractions and seed), so these
images were never trained on nor used for early stopping.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from omegaconf import OmegaConf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model URI or path; default: the best FINISHED run of --experiment")
    ap.add_argument("--experiment", default="mobilenet_cpu")
    ap.add_argument("--batch-sizes", default="64,256")
    args = ap.parse_args()

    import mlflow

    from bloodcell.data import load_arrays, split_arrays
    from bloodcell.predict import load_model, predict_arrays
    from bloodcell.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(OmegaConf.create({"uri": None})))
    runs = mlflow.search_runs(
        experiment_names=[args.experiment],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["metrics.best_val_accuracy DESC"],
        output_format="list",
    )
    if not runs:
        raise SystemExit(f"no finished run in experiment {args.experiment}; train one first")
    run = runs[0]
    model_uri = args.model or run.data.tags["model_uri"]
    data_cfg = OmegaConf.create(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml"))
    arrays = load_arrays(data_cfg.data)
    test = split_arrays(arrays, data_cfg.data.val_fraction, data_cfg.data.test_fraction, data_cfg.seed).test
    model = load_model(model_uri)
    predict_arrays(model, test.images[:64])  # warm-up: graph tracing is not throughput
    print(f"model {model_uri} (run {run.info.run_id}), {len(test)} held-out images {test.images.shape[1:]}")
    print(f"{'batch':>6} {'tta':>5} {'images/s':>10} {'accuracy':>9}")
    for batch_size in map(int, args.batch_sizes.split(",")):
        for tta in (False, True):
            tic = time.perf_counter()
            probabilities = predict_arrays(model, test.images, batch_size=batch_size, tta=tta)
            seconds = time.perf_counter() - tic
            accuracy = float(np.mean(probabilities.argmax(1) == test.labels))
            print(f"{batch_size:>6} {str(tta):>5} {len(test) / seconds:>10.0f} {accuracy:>9.4f}")


if __name__ == "__main__":
    main()
