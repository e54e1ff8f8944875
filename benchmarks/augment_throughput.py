"""Images per second of every augmentation pipeline beside what training the `mobilenet_cpu` preset consumes.

    python benchmarks/augment_throughput.py [--seconds 4] [--batch-size 64] [--image-size 96]

Each pipeline runs the way training runs it: a tf.data map over uint8 batches (cast, augment, then the
mixer if any), AUTOTUNE parallelism, prefetch, after a warm-up that includes tracing. The model is the
`mobilenet_cpu` preset (MobileNet alpha 0.25 upscaled to 128 inside the model, its head, its batch size)
built by bloodcell.models.build_model with weights=None (same compute as the real weights), timed with
model.fit on in-memory batches in both phases: frozen backbone (phase 1 with pretrained weights, the
hungriest consumer) and all layers trainable (phase 2). Ratio = pipeline img/s / phase-1 img/s; the goal
is >= 3 for the default pipeline (`base` at the preset's strength).

Pipelines and training are timed one after the other on the same cores; during real training they share
them, so the ratios are upper bounds. On a small shared machine the figures are noisy (+-20 % or more).
About 1.5-2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bloodcell.core.cli import compose

PIPELINES = ["none", "base", "heavy", "randaugment", "augmix", "mixup", "cutmix"]


def timed(iterator_step, seconds: float, warmup: int) -> tuple[float, int]:
    """Run warm-up steps, then steps until `seconds` pass; (seconds, steps) measured."""
    for _ in range(warmup):
        iterator_step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        iterator_step()
        steps += 1
    return time.perf_counter() - start, steps


def pipeline_rate(
    name: str, strength: float | None, images, labels, batch_size: int, seconds: float
) -> float:
    import tensorflow as tf

    from bloodcell import NUM_CLASSES
    from bloodcell.augment import build_augmentation, build_mixer

    overrides = [f"augmentation={name}"] + (
        [f"augmentation.strength={strength}"] if strength is not None else []
    )
    aug_cfg = compose(overrides).augmentation
    layer = build_augmentation(aug_cfg, seed=0)
    mixer = build_mixer(aug_cfg, NUM_CLASSES, seed=0)
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(batch_size, drop_remainder=True)
    ds = ds.map(
        lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, NUM_CLASSES)), num_parallel_calls=tf.data.AUTOTUNE
    )
    if layer is not None:
        ds = ds.map(lambda x, y: (layer(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    if mixer is not None:
        ds = ds.map(mixer, num_parallel_calls=tf.data.AUTOTUNE)
    it = iter(ds.prefetch(tf.data.AUTOTUNE))
    elapsed, steps = timed(lambda: next(it), seconds, warmup=3)
    return steps * batch_size / elapsed


def training_rates(images, labels, seconds: float) -> tuple[dict, int]:
    """img/s of model.fit for the mobilenet_cpu preset, frozen backbone and fully trainable."""
    import keras
    import numpy as np
    import tensorflow as tf

    from bloodcell import NUM_CLASSES
    from bloodcell.models import BACKBONE_LAYER, build_model
    from bloodcell.models.finetune import set_backbone_trainable

    cfg = compose(["+experiment=mobilenet_cpu", "backbone.weights=null"])
    batch = int(cfg.trainer.batch_size)
    onehot = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    ds = (
        tf.data.Dataset.from_tensor_slices((images.astype(np.float32), onehot))
        .repeat()
        .batch(batch)
        .prefetch(2)
    )
    rates = {}
    for phase, trainable in (("phase 1 (frozen backbone)", False), ("phase 2 (all layers)", True)):
        keras.utils.set_random_seed(0)
        model = build_model(cfg, images.shape[1:])
        set_backbone_trainable(model.get_layer(BACKBONE_LAYER), trainable, keep_batchnorm_frozen=True)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"]
        )
        model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)  # trace + warm up
        start = time.perf_counter()
        steps = 0
        while time.perf_counter() - start < seconds:
            model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)
            steps += 3
        rates[phase] = steps * batch / (time.perf_counter() - start)
    return rates, batch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per pipeline / phase")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's batch size")
    parser.add_argument("--image-size", type=int, default=96)
    args = parser.parse_args(argv)

    import tensorflow as tf

    from bloodcell.data import make_demo_set

    started = time.perf_counter()
    images, labels = make_demo_set(per_class=32, image_size=args.image_size, seed=0)
    train_rates, preset_batch = training_rates(images, labels, args.seconds)
    batch = args.batch_size or preset_batch
    preset = compose(["+experiment=mobilenet_cpu"])
    default_name, default_strength = preset.augmentation.name, float(preset.augmentation.strength)
    consume = train_rates["phase 1 (frozen backbone)"]

    rows = []
    for name in PIPELINES:
        strength = default_strength if name == default_name else None
        rate = pipeline_rate(name, strength, images, labels, batch, args.seconds)
        label_strength = (
            strength
            if strength is not None
            else float(compose([f"augmentation={name}"]).augmentation.strength)
        )
        rows.append((name, label_strength, rate))
        print(f"  measured {name}: {rate:,.0f} img/s", file=sys.stderr, flush=True)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"\naugmentation throughput vs training, {args.image_size}x{args.image_size}, batch {batch}, "
        f"{cores} CPU cores, TF {tf.__version__} (noisy: shared machine)\n"
    )
    print("| what | strength | images/s | x phase-1 training |")
    print("|---|---:|---:|---:|")
    for name, strength, rate in rows:
        mark = " (default)" if name == default_name else ""
        print(f"| augmentation={name}{mark} | {strength:g} | {rate:,.0f} | {rate / consume:.1f} |")
    for phase, rate in train_rates.items():
        print(f"| training mobilenet_cpu, {phase} | | {rate:,.0f} | |")
    default_ratio = dict((n, r) for n, _, r in rows)[default_name] / consume
    verdict = "meets" if default_ratio >= 3 else "MISSES"
    print(
        f"\ndefault pipeline ({default_name} @ {default_strength:g}) delivers {default_ratio:.1f}x what "
        f"phase-1 training consumes: {verdict} the 3x goal. ({time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
