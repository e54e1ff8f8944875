"""How much the regions Grad-CAM points at matter to a trained run's model (a deletion test): on the run's
test split, the 20% of pixels Grad-CAM ranks highest are replaced by the image's median colour (its
background), and the mean drop of the predicted class's probability is compared with the same for the 20%
it ranks lowest and for a random smooth blob of the same area (a 4x4 random map, upsampled like the heat
map). A heat map that shows what the model uses drops the probability more than a random blob does.

    python benchmarks/gradcam_deletion.py <run id>
    python benchmarks/gradcam_deletion.py <run id> --store sqlite:////tmp/store/mlflow.db --limit 200

The test images are loaded again from the run's config (its data must still be where it was).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_id")
    ap.add_argument("--store", help="MLflow tracking URI; default: the project's mlruns/mlflow.db")
    ap.add_argument("--limit", type=int, default=None, help="use the first N test images")
    ap.add_argument("--share", type=float, default=0.2, help="share of the pixels replaced")
    args = ap.parse_args()

    import mlflow
    import tensorflow as tf
    from omegaconf import OmegaConf

    from bloodcell.evaluation.gradcam import GradCam
    from bloodcell.serving.loading import load_model
    from bloodcell.serving.prediction import predict_arrays
    from bloodcell.tracking import resolve_tracking_uri
    from bloodcell.training.run_data import run_splits

    mlflow.set_tracking_uri(args.store or resolve_tracking_uri(OmegaConf.create({"uri": None})))
    run = mlflow.get_run(args.run_id)
    test = run_splits(run).splits.test
    images, labels = test.images[: args.limit], test.labels[: args.limit]
    model = load_model(f"runs:/{args.run_id}/model")
    start = time.perf_counter()
    cam = GradCam.of(model)
    maps, probabilities = cam.heatmaps(images)
    seconds = time.perf_counter() - start
    predicted = probabilities.argmax(axis=1)
    rows = np.arange(len(images))
    before = probabilities[rows, predicted]
    background = np.median(images.reshape(len(images), -1, 3), axis=1)
    rng = np.random.default_rng(0)
    size = images.shape[1:3]

    def blob(i: int) -> np.ndarray:
        return np.asarray(tf.image.resize(rng.uniform(size=(4, 4, 1)), size))[..., 0]

    def drop(rank: Callable[[int], np.ndarray]) -> float:
        """Mean drop of the predicted class's probability when the top ``share`` of ``rank(i)`` goes."""
        out = images.copy()
        for i in range(len(images)):
            # ties (a heat map is 0 wherever ReLU cut it) broken by a smooth random map: scattered pixels
            # would hurt the model more than any one region, whatever Grad-CAM says
            key = (rank(i) + 1e-4 * blob(i)).ravel()
            top = np.argsort(-key, kind="stable")[: int(args.share * key.size)]
            out[i].reshape(-1, 3)[top] = background[i]
        return float(np.mean(before - predict_arrays(model, out)[rows, predicted]))

    print(
        f"run {args.run_id}: {len(images)} test images, accuracy {np.mean(predicted == labels):.3f}, "
        f"Grad-CAM on {cam.layer} in {seconds:.1f} s; predicted-class probability {before.mean():.3f}"
    )
    share = f"{args.share:.0%}"
    for name, rank in [
        (f"highest-ranked {share} (Grad-CAM)", lambda i: maps[i]),
        (f"lowest-ranked {share} (Grad-CAM)", lambda i: -maps[i]),
        (f"random blob of {share}", blob),
    ]:
        print(f"  replacing the {name:34s} drops it by {drop(rank):.3f}")


if __name__ == "__main__":
    main()
