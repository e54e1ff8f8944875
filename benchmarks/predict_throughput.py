"""Inference throughput of `bloodcell.predict` (images per second) on the held-out test split, with and
without test-time augmentation, and the held-out accuracy each gives.

    python benchmarks/predict_throughput.py                           # best mobilenet_cpu run in mlruns/
    python benchmarks/predict_throughput.py --model models:/bloodcell@champion
    python benchmarks/predict_throughput.py --ensemble 3              # + an ensemble of the 3 best runs

The test split is rebuilt exactly as training made it (same data file, fractions and seed), so these
images were never trained on nor used for early stopping.

``--ensemble K`` adds a second arm, measured in the same process on the same images, alternating with the
first at every batch size: the K best FINISHED runs of the experiment on the best run's split, averaged into
one model as `python -m bloodcell.ensemble` builds it (`bloodcell.ensemble.build_ensemble`); the first arm
is then the best of them alone. ``--repeats N`` times each figure N times and keeps the fastest pass.
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
    ap.add_argument("--ensemble", type=int, default=0, help="also an ensemble of the K best runs (K >= 2)")
    ap.add_argument("--no-tta", action="store_true", help="plain predictions only")
    ap.add_argument("--tracking-uri", help="default: the project's mlruns/ store")
    ap.add_argument("--repeats", type=int, default=1, help="passes per figure; the fastest counts")
    ap.add_argument("--min-images", type=int, default=0, help="time the test images repeated to this many")
    args = ap.parse_args()

    import mlflow

    from bloodcell.serving.loading import load_model
    from bloodcell.serving.prediction import predict_arrays
    from bloodcell.tracking import resolve_tracking_uri
    from bloodcell.training.run_data import run_splits

    mlflow.set_tracking_uri(resolve_tracking_uri(OmegaConf.create({"uri": args.tracking_uri})))
    runs = mlflow.search_runs(
        experiment_names=[args.experiment],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["metrics.best_val_accuracy DESC"],
        output_format="list",
    )
    runs = [r for r in runs if "bloodcell.ensemble" not in r.data.tags]  # ensembles are built here
    if not runs:
        raise SystemExit(f"no finished run in experiment {args.experiment}; train one first")
    run = runs[0]
    model_uri = args.model or run.data.tags["model_uri"]
    test = run_splits(run).splits.test  # loaded as the run loaded it, checked by its split fingerprint
    # a small test split times a fraction of a second, which other jobs blur: repeated, it takes longer
    images = np.concatenate([test.images] * max(1, -(-args.min_images // len(test))))
    arms = [(f"run {run.info.run_id[:8]}: {model_uri}", load_model(model_uri))]
    if args.ensemble:
        from bloodcell.evaluation.ensemble import build_ensemble

        split = run.data.tags.get("split_fingerprint")
        same = [r for r in runs if r.data.tags.get("split_fingerprint") == split]
        members = [r for r in same if r.data.tags.get("model_uri")][: args.ensemble]
        if len(members) < max(args.ensemble, 2):
            raise SystemExit(f"--ensemble {args.ensemble}: {len(members)} runs with a model on this split")
        models = [load_model(r.data.tags["model_uri"]) for r in members]
        arms = [
            (f"run {members[0].info.run_id[:8]} (the best member)", models[0]),
            (f"ensemble of {len(members)} runs", build_ensemble(models, [1] * len(models))),
        ]
    print(f"{len(test)} held-out images {test.images.shape[1:]}, timed on {len(images)}")
    print(f"{'model':<44} {'batch':>6} {'tta':>5} {'images/s':>10} {'accuracy':>9}")
    for batch_size in map(int, args.batch_sizes.split(",")):
        for tta in (False,) if args.no_tta else (False, True):
            for name, model in arms:  # side by side: the arms alternate, so load changes hit both alike
                predict_arrays(model, images[:batch_size], batch_size=batch_size)  # warm-up: tracing
                seconds = float("inf")
                for _ in range(args.repeats):  # the fastest pass: the one other jobs slowed least
                    tic = time.perf_counter()
                    probabilities = predict_arrays(model, images, batch_size=batch_size, tta=tta)
                    seconds = min(seconds, time.perf_counter() - tic)
                accuracy = float(np.mean(probabilities[: len(test)].argmax(1) == test.labels))
                rate = len(images) / seconds
                print(f"{name[:44]:<44} {batch_size:>6} {str(tta):>5} {rate:>10.0f} {accuracy:>9.4f}")


if __name__ == "__main__":
    main()
