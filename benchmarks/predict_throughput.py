"""Inference throughput of `bloodcell.predict` (images per second) on the held-out test split, with and
without test-time augmentation, and the held-out accuracy each gives.

    python benchmarks/predict_throughput.py                           # best mobilenet_cpu run in mlruns/
    python benchmarks/predict_throughput.py --model models:/bloodcell@champion
    python benchmarks/predict_throughput.py --ensemble 3              # + an ensemble of the 3 best runs
    python benchmarks/predict_throughput.py --experiment mobilenet_cpu,lite0_cpu --serve   # two presets

The test split is rebuilt exactly as training made it (same data file, fractions and seed), so these
images were never trained on nor used for early stopping.

``--ensemble K`` adds a second arm, measured in the same process on the same images, alternating with the
first at every batch size: the K best FINISHED runs of the experiment on the best run's split, averaged into
one model as `python -m bloodcell.ensemble` builds it (`bloodcell.ensemble.build_ensemble`); the first arm
is then the best of them alone. ``--repeats N`` times each figure N times and keeps the fastest pass.

``--experiment a,b`` makes each experiment's best run an arm (their runs must share one split). ``--serve``
also times each arm's model as plain MLflow serves it: ``mlflow models serve --env-manager local`` started
on a free local port, the images POSTed as a JSON tensor (``{"inputs": ...}``, the 0-255 cells as stored) in
batches, the probabilities read back; what a client of the served model waits for, JSON included
(``--serve-images``: the first 512 test images by default: JSON made it 20-70x slower than in-process).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model URI or path; default: the best FINISHED run of --experiment")
    ap.add_argument("--experiment", default="mobilenet_cpu", help="one, or several comma-separated")
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--ensemble", type=int, default=0, help="also an ensemble of the K best runs (K >= 2)")
    ap.add_argument("--no-tta", action="store_true", help="plain predictions only")
    ap.add_argument("--tracking-uri", help="default: the project's mlruns/ store")
    ap.add_argument("--repeats", type=int, default=1, help="passes per figure; the fastest counts")
    ap.add_argument("--min-images", type=int, default=0, help="time the test images repeated to this many")
    ap.add_argument("--serve", action="store_true", help="also through `mlflow models serve`")
    # JSON is slow (37 MB a batch of 256 cells): the served figure is timed on the first 512 test images
    ap.add_argument("--serve-images", type=int, default=512, help="test images POSTed per pass")
    args = ap.parse_args()

    import mlflow

    from bloodcell.serving.loading import load_model
    from bloodcell.serving.prediction import predict_arrays
    from bloodcell.tracking import resolve_tracking_uri
    from bloodcell.training.run_data import run_splits

    tracking_uri = resolve_tracking_uri(OmegaConf.create({"uri": args.tracking_uri}))
    mlflow.set_tracking_uri(tracking_uri)
    best_runs = [best_finished_runs(mlflow, name) for name in args.experiment.split(",")]
    runs = best_runs[0]
    run = runs[0]
    splits = {r[0].data.tags.get("split_fingerprint") for r in best_runs}
    if len(splits) > 1:
        raise SystemExit(f"--experiment {args.experiment}: their best runs have different test splits")
    test = run_splits(run).splits.test  # loaded as the run loaded it, checked by its split fingerprint
    # a small test split times a fraction of a second, which other jobs blur: repeated, it takes longer
    images = np.concatenate([test.images] * max(1, -(-args.min_images // len(test))))
    if args.model:  # on the split of --experiment's best run
        uris, names = [args.model], [args.model]
    else:
        uris = [r[0].data.tags["model_uri"] for r in best_runs]
        experiments = args.experiment.split(",")
        names = [f"{e} run {r[0].info.run_id[:8]}" for e, r in zip(experiments, best_runs)]
    arms = [(name, load_model(uri)) for name, uri in zip(names, uris)]
    if args.ensemble and (args.serve or len(best_runs) > 1):
        raise SystemExit("--ensemble takes one --experiment and no --serve (the ensemble is built here)")
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
    if args.serve:
        serve_arms(
            list(zip(names, uris)),
            tracking_uri,
            test.images[: args.serve_images],
            test.labels[: args.serve_images],
            args,
        )


def best_finished_runs(mlflow, experiment: str) -> list:
    """The experiment's FINISHED training runs, best validation first (ensembles are built here)."""
    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["metrics.best_val_accuracy DESC"],
        output_format="list",
    )
    runs = [r for r in runs if "bloodcell.ensemble" not in r.data.tags]
    if not runs:
        raise SystemExit(f"no finished run in experiment {experiment}; train one first")
    return runs


def serve_arms(arms: list[tuple[str, str]], tracking_uri: str, images, labels, args) -> None:
    """images/s of each model behind `mlflow models serve` (one server per model, all started first, the
    arms alternating at every batch size), JSON encoding and decoding included."""
    import json
    import os
    import subprocess
    import sys
    import urllib.request

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.helpers import free_port

    servers = []
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "CUDA_VISIBLE_DEVICES": ""}
    try:
        for _, uri in arms:
            port = free_port()
            command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
            command += ["-h", "127.0.0.1", "-p", str(port), "-w", "1"]
            servers.append(
                (
                    port,
                    subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                )
            )
        for port, server in servers:
            wait_until_served(port, server)

        def post(port: int, batch) -> np.ndarray:
            body = json.dumps({"inputs": batch.tolist()}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=600) as response:
                return np.asarray(json.load(response)["predictions"], np.float32)

        print(f"\nthrough `mlflow models serve` (JSON tensors over local HTTP), timed on {len(images)}")
        print(f"{'model':<44} {'batch':>6} {'images/s':>10} {'accuracy':>9}")
        for batch_size in map(int, args.batch_sizes.split(",")):
            for (name, _), (port, _) in zip(arms, servers):
                post(port, images[:batch_size])  # warm-up: the server's first call traces the model
                seconds = float("inf")
                for _ in range(args.repeats):
                    tic = time.perf_counter()
                    batches = [
                        post(port, images[i : i + batch_size]) for i in range(0, len(images), batch_size)
                    ]
                    seconds = min(seconds, time.perf_counter() - tic)
                probabilities = np.concatenate(batches)
                assert probabilities.shape == (len(images), 8), probabilities.shape
                accuracy = float(np.mean(probabilities[: len(labels)].argmax(1) == labels))
                print(f"{name[:44]:<44} {batch_size:>6} {len(images) / seconds:>10.0f} {accuracy:>9.4f}")
    finally:
        for _, server in servers:
            server.terminate()
            server.wait(timeout=30)


def wait_until_served(port: int, server, timeout: float = 300) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow models serve exited {server.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).close()
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"mlflow models serve did not answer within {timeout:.0f} s")


if __name__ == "__main__":
    main()
