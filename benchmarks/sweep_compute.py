"""Sweep compute with and without phase-1 reuse (issue 19): one fine-tuning study run twice.

The study is the shipped ``sweeps/finetune.yaml`` (TPE with its sampler seed, the median pruner, the space
finetune.unfreeze_blocks x finetune.lr x finetune.augmentation_strength) on the mobilenet_cpu preset (the
shared ImageNet MobileNet) cut to CPU size: a stratified sample of real cells from ../shared/data/pbc96
(written once as an npz by ../shared/data/build_training_set.py), 96 px input, phase 1 a third of a
trial's epochs (2 head epochs, then 4 of fine-tuning; early stopping and the preset's time limit off, so
every trial's phase 1 is the same). Both runs start from empty stores (their own MLflow store, Optuna
journal and checkpoint root) and differ only in ``trainer.reuse_phase1``. With the sampler seed fixed and
the same states reached, both draw the same trials and reach the same values, so the best value must agree
within float noise; the difference is wall time and epochs trained.

    python benchmarks/sweep_compute.py                      # 8 trials, 2 + 4 epochs, 2,000 cells
    python benchmarks/sweep_compute.py --trials 30 --limit 4000 --epochs 5 --finetune-epochs 10

Measured (2026-12-02, the shared 2-core CPU): defaults, 261 s without reuse and 191 s with it (27% less
wall time; 666 and 530 s, 20%, in an earlier run under heavy load), 44 and 30 epochs trained (7 of 8 trials
reused phase 1); ``--trials 6 --epochs 4 --finetune-epochs 4`` (phase 1 half the epochs): 385 and 233 s
(40%), 42 and 22 epochs. Both times the same trials were drawn and every trial's value was identical.

Prints per arm: wall seconds, epochs trained (reported epochs less those copied from a stored phase 1),
trials that reused phase 1, best value, and the largest difference between the two runs' trial values.
Results (logs, stores) go to benchmarks/results/sweep_compute_<time>/ (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


def cells(args: argparse.Namespace) -> Path:
    """A competition-layout npz of ``--limit`` real cells (built once; trials then load it in a second)."""
    path = args.out / f"cells_{args.limit}.npz"
    if not path.exists():
        subprocess.run(
            [
                sys.executable,
                str(SHARED / "data" / "build_training_set.py"),
                str(path),
                "--limit",
                str(args.limit),
            ],
            check=True,
        )
    return path


def run_sweep(args: argparse.Namespace, name: str, reuse: bool, data: Path) -> float:
    """One sweep of the study in ``<out>/<name>/``; returns its wall seconds."""
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "bloodcell.train",
        "-m",
        "+sweeps=finetune",
        "experiment=mobilenet_cpu",
        f"hydra.sweeper.study_name={name}",
        f"hydra.sweeper.storage=journal:{folder / 'optuna.journal'}",
        f"hydra.sweeper.n_trials={args.trials}",
        f"hydra.sweeper.sampler.seed={args.seed}",
        f"hydra.sweep.dir={folder / 'multirun'}",
        f"trainer.reuse_phase1={str(reuse).lower()}",
        "data=npz",
        f"data.path={data}",
        f"data.val_fraction={args.val_fraction}",
        f"data.test_fraction={args.test_fraction}",
        f"backbone.input_size={args.input_size}",
        f"trainer.epochs={args.epochs}",
        f"finetune.epochs={args.finetune_epochs}",
        f"finetune.lr_decay_steps={args.decay_steps}",
        # every trial trains the epochs it is given (pruning aside): phase 1 is a fixed share of a trial
        f"trainer.early_stopping_patience={args.epochs}",
        f"finetune.early_stopping_patience={args.finetune_epochs}",
        "trainer.time_limit_minutes=null",
        "trainer.test_tta=false",
        "trainer.verbose=0",
        "tracking.log_model=false",
        f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",  # checkpoints (and phase-1 entries) beside it
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    tic = time.perf_counter()
    with open(args.out / f"{name}.log", "w") as log:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"the {name} sweep failed (exit {proc.returncode}); see {args.out / f'{name}.log'}")
    return time.perf_counter() - tic


def summarize(args: argparse.Namespace, name: str, seconds: float) -> dict[str, Any]:
    import optuna

    from bloodcell.sweep.trial import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(f"journal:{args.out / name / 'optuna.journal'}")
    trials = optuna.load_study(study_name=name, storage=storage).trials
    reported = sum(len(t.intermediate_values) for t in trials)
    copied = sum(int(t.user_attrs.get("phase1_reused_epochs", 0)) for t in trials)
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    return {
        "name": name,
        "seconds": seconds,
        "epochs": reported - copied,
        "reused": sum("phase1_reused_epochs" in t.user_attrs for t in trials),
        "pruned": sum(t.state.name == "PRUNED" for t in trials),
        "best": max((float(t.value or 0.0) for t in complete), default=float("nan")),
        "values": {t.number: t.value for t in complete},
        "params": {t.number: t.params for t in trials},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42, help="the sampler's seed (the study's own: 42)")
    parser.add_argument("--limit", type=int, default=2000, help="real cells sampled from pbc96")
    parser.add_argument("--val-fraction", type=float, default=0.3)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=2, help="phase 1 (head) epochs per trial")
    parser.add_argument("--finetune-epochs", type=int, default=4, help="phase 2 epochs per trial")
    parser.add_argument("--decay-steps", type=int, default=16, help="about one epoch of the training split")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.out = args.out or ROOT / "benchmarks" / "results" / time.strftime("sweep_compute_%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    data = cells(args)
    rows = []
    for name, reusing in (("retrain", False), ("reuse", True)):
        seconds = run_sweep(args, name, reusing, data)
        rows.append(summarize(args, name, seconds))
        print(f"{name}: {seconds:.0f} s", flush=True)

    retrain, reuse = rows
    print(
        f"\n{args.trials} trials of sweeps/finetune.yaml on mobilenet_cpu, {args.limit} cells, "
        f"{args.epochs} + {args.finetune_epochs} epochs, sampler seed {args.seed}"
    )
    print(f"{'':8} {'wall s':>8} {'epochs':>7} {'reused':>7} {'pruned':>7} {'best':>8}")
    for r in rows:
        counts = f"{r['epochs']:7d} {r['reused']:7d} {r['pruned']:7d}"
        print(f"{r['name']:8} {r['seconds']:8.0f} {counts} {r['best']:8.4f}")
    same_trials = retrain["params"] == reuse["params"]
    shared = set(retrain["values"]) & set(reuse["values"])
    gap = max((abs(retrain["values"][n] - reuse["values"][n]) for n in shared), default=float("nan"))
    best_gap = abs(retrain["best"] - reuse["best"])
    print(
        f"reuse: {1 - reuse['seconds'] / retrain['seconds']:.0%} less wall time, "
        f"{1 - reuse['epochs'] / max(retrain['epochs'], 1):.0%} fewer epochs; same trials drawn: "
        f"{same_trials}; largest trial-value difference {gap:.2e}; best values differ by {best_gap:.2e}"
    )


if __name__ == "__main__":
    main()
