"""Training and inference images/s of an experiment's model, per phase, in float32 and mixed precision.

    python benchmarks/gpu_throughput.py                                   # effnetb2, float32 vs mixed_float16
    python benchmarks/gpu_throughput.py --policies float32 mixed_bfloat16 --batch-sizes 32 128
    python benchmarks/gpu_throughput.py --experiment mobilenet_cpu --images 512   # a quick CPU check

The model is the one `python -m bloodcell.train +experiment=<name>` builds (bloodcell.models.build_model:
resize to the backbone's side, backbone, dense head), with random weights (`backbone.weights=null`: the
arithmetic is the same as ImageNet's). Phase 1 trains the head on a frozen backbone, phase 2 the top
`finetune.unfreeze_blocks` blocks with BatchNorm frozen, both with the recipe's optimizer. Inputs are random
96x96 pixels already in memory, so the figures are the model's: bloodcell's tf.data/KerasCV augmentation
pipeline is measured by benchmarks/augment_throughput.py.

Each figure is the mean over --epochs timed passes over --images images after one untimed pass (which pays
for tracing and compilation, reported as "first pass s"). The script only uses Keras, so it runs on any
Keras 3 backend (KERAS_BACKEND=tensorflow, jax or torch) and prints which one it measured."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(cfg, policy: str, batch_size: int, images, labels, epochs: int) -> dict:
    import keras

    from bloodcell.models import BACKBONE_LAYER, build_model
    from bloodcell.models.finetune import optimizer, set_backbone_trainable, unfreeze

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(policy)
    model = build_model(cfg, images.shape[1:])
    backbone = model.get_layer(BACKBONE_LAYER)
    row = {"policy": policy, "batch": batch_size}
    for phase in ("phase 1", "phase 2"):
        if phase == "phase 1":
            set_backbone_trainable(backbone, False, keep_batchnorm_frozen=True)
            lr = cfg.trainer.lr
        else:
            row["trainable layers"] = unfreeze(backbone, cfg)
            lr = cfg.finetune.lr
        model.compile(
            optimizer=optimizer(lr, cfg.trainer.lr_decay_steps, cfg.trainer.lr_decay_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        # wall time when training starts and at each epoch end (a sync point on every backend: logs are read)
        times: list[float] = []
        tick = times.append  # bound now: each fit gets its own list
        clock = keras.callbacks.LambdaCallback(
            on_train_begin=lambda logs, tick=tick: tick(time.perf_counter()),
            on_epoch_end=lambda epoch, logs, tick=tick: tick(time.perf_counter()),
        )
        model.fit(
            images,
            labels,
            batch_size=batch_size,
            epochs=1 + epochs,
            verbose=0,
            shuffle=False,
            callbacks=[clock],
        )
        start, first, *rest = times
        row[f"{phase} first pass s"] = first - start
        row[f"{phase} img/s"] = epochs * len(images) / (rest[-1] - first)
    predict_batch = batch_size * 4
    model.predict(images[: predict_batch * 2], batch_size=predict_batch, verbose=0)  # trace this batch shape
    tic = time.perf_counter()
    model.predict(images, batch_size=predict_batch, verbose=0)
    row["predict img/s"] = len(images) / (time.perf_counter() - tic)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="effnetb2", help="an experiment preset in conf/experiment/")
    parser.add_argument(
        "--policies",
        nargs="+",
        default=["float32", "mixed_float16"],
        help="Keras dtype policies (trainer.mixed_precision=true is mixed_float16)",
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32])
    parser.add_argument("--images", type=int, default=2048, help="images per timed pass")
    parser.add_argument("--epochs", type=int, default=2, help="timed passes per phase")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. finetune.unfreeze_blocks=3")
    args = parser.parse_args()

    import keras
    import numpy as np

    from bloodcell.core.cli import compose

    cfg = compose([f"+experiment={args.experiment}", "backbone.weights=null", *args.overrides])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 96, 96, 3)).astype("float32")
    labels = rng.integers(0, 8, args.images)
    devices = keras.distribution.list_devices()
    print(
        f"{args.experiment} ({cfg.backbone.name} at {cfg.backbone.input_size or 'native'} px, "
        f"unfreeze_blocks={cfg.finetune.unfreeze_blocks}), "
        f"Keras {keras.__version__} on {keras.backend.backend()}, "
        f"devices {devices}, {args.images} images x {args.epochs} timed passes"
    )
    columns = [
        "policy",
        "batch",
        "phase 1 img/s",
        "phase 2 img/s",
        "predict img/s",
        "trainable layers",
        "phase 1 first pass s",
        "phase 2 first pass s",
    ]
    widths = [max(len(c), 13) + 2 for c in columns]
    print("".join(f"{c:>{w}}" for c, w in zip(columns, widths)), flush=True)
    rows = []
    for batch in args.batch_sizes:
        for policy in args.policies:  # a row as soon as it is measured: a long run shows its progress
            row = measure(cfg, policy, batch, images, labels, args.epochs)
            rows.append(row)
            print(
                "".join(
                    f"{row[c]:>{w}.1f}" if isinstance(row[c], float) else f"{row[c]:>{w}}"
                    for c, w in zip(columns, widths)
                ),
                flush=True,
            )
    base = {row["batch"]: row for row in rows if row["policy"] == args.policies[0]}
    for row in rows:
        if row["policy"] != args.policies[0]:
            ratios = ", ".join(
                f"{key} x{row[key] / base[row['batch']][key]:.2f}"
                for key in ("phase 1 img/s", "phase 2 img/s", "predict img/s")
            )
            print(f"{row['policy']} vs {args.policies[0]} at batch {row['batch']}: {ratios}")


if __name__ == "__main__":
    main()
