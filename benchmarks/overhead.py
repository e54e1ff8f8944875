"""The framework's overhead: wall time of `python -m bloodcell.train` against the time spent inside Keras'
fit in the same run (start-up, data, MLflow logging and saving are the rest).

    python benchmarks/overhead.py                       # mobilenet_cpu on data/training_set.npz, 3 epochs
    python benchmarks/overhead.py --preset quickstart   # no data file needed
    python benchmarks/overhead.py --profile             # and which calls take the time outside fit
    python benchmarks/overhead.py --baseline 8e4e177    # that commit's code first, side by side

Prints one table: wall seconds, seconds inside fit, and each part bloodcell logs (time/seconds_* metrics).
The goal is at most 10% overhead for a 3-epoch CPU run. For mobilenet_cpu it also runs the same 3 epochs as
a hand-written Keras script (benchmarks/plain_keras.py), right after, and prints that script's own time
outside fit: interpreter, TensorFlow import, data, model build and test predictions cost any script, so
the difference is what bloodcell itself adds. Machines here are shared: run it twice.

``--profile`` runs bloodcell's command once more under cProfile and prints, for each step of a run, the
calls inside it that took more than a tenth of a second (cumulative; cProfile slows Python-heavy code, so
read the shares, not the seconds).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mobilenet_cpu")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-Keras comparison")
    ap.add_argument("--profile", action="store_true", help="also profile one run: which call, how long")
    ap.add_argument("--baseline", help="a git commit whose code runs the same command first (before/after)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    if args.preset == "mobilenet_cpu" and not (REPO / "data" / "training_set.npz").is_file():
        sys.exit(
            "data/training_set.npz missing: python ../shared/data/build_training_set.py data/training_set.npz"
        )
    arms: list[tuple[str, float, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            from baseline import checkout

            with checkout(args.baseline) as code:
                arms.append((f"at {args.baseline}", *timed_run(code, Path(tmp) / "baseline", args)))
        arms.append(("this checkout", *timed_run(REPO, Path(tmp) / "current", args)))
    print(f"{args.preset}, {args.epochs} epochs, {os.cpu_count()} CPUs")
    print(f"{'part':<48}" + "".join(f"{name:>22}" for name, _, _ in arms))
    labels = [
        ("wall (python -m bloodcell.train)", "wall"),
        ("inside Keras fit", "fit"),
        ("interpreter + imports + Hydra (outside train())", "outside_train"),
        ("data: load, validate, fingerprint, split", "data"),
        ("setup: TF import, model build, MLflow run", "rest"),
        ("evaluate: predictions, metrics, plots, sheets", "evaluate"),
        ("log_model: save + upload the model", "log_model"),
    ]
    for label, key in labels:
        cells = "".join(
            f"{parts.get(key, 0.0):>13.1f} s {parts.get(key, 0.0) / wall:>6.1%}" for _, wall, parts in arms
        )
        print(f"{label:<48}{cells}")
    for name, wall, parts in arms:
        print(f"{name}: overhead (wall - fit) / wall {(wall - parts['fit']) / wall:.1%}")
    if args.preset != "mobilenet_cpu" or args.no_plain:
        return
    plain_wall, plain_fit = plain_keras_run(args.epochs)
    print(
        f"plain Keras script, same {args.epochs} epochs: {plain_wall:.1f} s wall, {plain_fit:.1f} s in fit, "
        f"{plain_wall - plain_fit:.1f} s outside fit ({(plain_wall - plain_fit) / plain_wall:.1%})"
    )
    for name, wall, parts in arms:
        extra = (wall - parts["fit"]) - (plain_wall - plain_fit)
        share = f"{extra / wall:+.1%} of its wall"
        print(f"{name}: bloodcell's own overhead beyond the plain script {extra:+.1f} s ({share})")


def timed_run(code: Path, folder: Path, args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """Wall seconds of the run with the code in ``code`` (a checkout), its store in ``folder``, and its parts:
    the run's ``time/seconds_*`` metrics, with ``outside_train`` (wall less time in train()) and ``rest``
    (time in train() that no part names: TF import, model build, the MLflow run)."""
    import mlflow

    folder.mkdir(parents=True)
    uri = f"sqlite:///{folder}/mlflow.db"
    # A user's store exists after their first run; creating its tables (~2 s, once) is not per-run cost.
    mlflow.set_tracking_uri(uri)
    mlflow.search_experiments()
    train_args = [
        "bloodcell.train",
        f"+experiment={args.preset}",
        f"trainer.epochs={args.epochs}",
        "finetune.epochs=0",
        "trainer.early_stopping_patience=100",
        # test-time augmentation is an optional 8x test pass (the preset turns it on), not overhead
        "trainer.test_tta=false",
        "trainer.verbose=0",
        f"tracking.uri={uri}",
        # the demo preset makes its own cells (it has no data.path)
        *([] if args.preset == "quickstart" else [f"data.path={REPO / 'data' / 'training_set.npz'}"]),
        f"hydra.run.dir={folder / 'outputs'}",
        *args.overrides,
    ]
    # the checkout's own package first (python -m puts the working directory first on the path)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(code)}
    tic = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", *train_args], cwd=code, capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - tic
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    if args.profile and code == REPO:
        profile = folder / "train.prof"
        command = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", *train_args]
        proc = subprocess.run(command, cwd=code, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        print_profile(profile)
    prefix = "time/seconds_"
    parts = {k[len(prefix) :]: v for k, v in run.data.metrics.items() if k.startswith(prefix)}
    parts["outside_train"] = wall - parts["in_train"]
    named = ("data", "fit", "evaluate", "log_model", "targets")
    parts["rest"] = parts["in_train"] - sum(parts.get(k, 0.0) for k in named)
    return wall, parts | {"wall": wall}


#: the steps of a run (bloodcell.training.recipe.run_steps and what it calls) whose insides --profile shows
PROFILED_STEPS = (
    "recipe.py:run_steps",
    "run_data.py:start_loading",
    "setup.py:build",
    "resume.py:start_or_resume",
    "recipe.py:evaluate_splits",
    "record.py:record",
    "record.py:record_explanations",
)


def print_profile(path: Path, at_least: float = 0.1) -> None:
    """Per step of `PROFILED_STEPS`, the calls it makes that took at least ``at_least`` seconds."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]

    def name(key: tuple[str, int, str]) -> str:
        where = key[0].split("site-packages/")[-1].replace(str(REPO) + "/", "")
        return f"{where}:{key[2]}"

    print("\nprofile (cProfile, cumulative seconds; the steps of one run and the calls inside them)")
    for step in PROFILED_STEPS:
        file, function = step.split(":")
        keys = [k for k in stats if k[0].endswith(f"/{file}") and k[2] == function]
        for key in keys:
            print(f"{name(key):<60}{stats[key][3]:>8.2f}")
            inside = [(callers[key][3], name(k)) for k, (*_, callers) in stats.items() if key in callers]
            for seconds, callee in sorted(inside, reverse=True):
                if seconds >= at_least:
                    print(f"    {callee:<56}{seconds:>8.2f}")


def plain_keras_run(epochs: int) -> tuple[float, float]:
    """Wall and fit seconds of benchmarks/plain_keras.py for the same phase-1 epochs (no fine-tuning)."""
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "plain_keras.py"),
        "--epochs",
        str(epochs),
        "--finetune-epochs",
        "0",
    ]
    tic = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    )
    wall = time.perf_counter() - tic
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return wall, float(re.search(r"([0-9.]+) s in fit", proc.stdout).group(1))


if __name__ == "__main__":
    main()
