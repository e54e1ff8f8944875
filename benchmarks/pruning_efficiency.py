"""Pruning efficiency: the same Optuna study run twice, without and with a pruner; prints each one's best
objective and the epochs it trained in total.

    python benchmarks/pruning_efficiency.py                       # ~15 min on 2 busy CPU cores
    python benchmarks/pruning_efficiency.py --trials 16 --image-size 64 --per-class 120

The study is sweeps/quick.yaml (quickstart preset: built-in SYNTHETIC demo data, small CNN) with the phase-1
learning rate added to its space, so some trials learn slowly and a pruner has something to stop. Both runs
use the random sampler with one seed, so they draw the same trials in the same order: the difference is
the pruner alone (TPE would steer each run differently). Accuracy on the demo data says nothing about real
cells; the figures are about how many epochs pruning saves. Goal (issue 4): best value within 0.5 accuracy
points of the unpruned run with at most 40% of its epochs.

Each run is a real `python -m bloodcell.train -m` sweep; its Optuna journal and MLflow store go to
benchmarks/results/pruning_<time>/ (git-ignored).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_sweep(out: Path, name: str, pruner: list[str], args: argparse.Namespace) -> float:
    command = [sys.executable, "-m", "bloodcell.train", "-m", "+sweeps=quick",
               f"hydra.sweeper.study_name={name}", f"hydra.sweeper.storage=journal:{out / 'optuna.journal'}",
               f"hydra.sweeper.n_trials={args.trials}", "hydra.sweeper.sampler.name=random",
               f"hydra.sweeper.sampler.seed={args.seed}", *pruner,
               "trainer.lr=tag(log, interval(1e-5, 1e-1))",
               f"data.image_size={args.image_size}", f"data.per_class={args.per_class}",
               f"trainer.epochs={args.epochs}", f"finetune.epochs={args.finetune_epochs}",
               # no early stopping: both runs train every epoch a trial is given
               f"trainer.early_stopping_patience={args.epochs}",
               f"finetune.early_stopping_patience={args.finetune_epochs}",
               "trainer.verbose=0", "tracking.log_model=false", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
               f"hydra.sweep.dir={out / name}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    tic = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"the {name} sweep failed (exit {proc.returncode}); see {out / f'{name}.log'}")
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=6, help="phase 1 epochs per trial")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="phase 2 epochs per trial")
    parser.add_argument("--pruner", default="median", help="median | successive_halving | hyperband ...")
    parser.add_argument("--warmup", type=int, default=1, help="epochs before the median pruner may prune")
    args = parser.parse_args()

    out = ROOT / "benchmarks" / "results" / time.strftime("pruning_%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    pruner = [f"hydra.sweeper.pruner.name={args.pruner}"]
    if args.pruner == "median":
        pruner += ["hydra.sweeper.pruner.median.n_startup_trials=2",
                   f"hydra.sweeper.pruner.median.n_warmup_steps={args.warmup}"]
    seconds = {"unpruned": run_sweep(out, "unpruned", ["hydra.sweeper.pruner.name=none"], args),
               "pruned": run_sweep(out, "pruned", pruner, args)}

    import optuna

    from bloodcell.trial import open_storage

    storage = open_storage(f"journal:{out / 'optuna.journal'}")
    rows = {}
    for name in ("unpruned", "pruned"):
        trials = optuna.load_study(study_name=name, storage=storage).trials
        best = max((t.value for t in trials if t.value is not None and t.state.name == "COMPLETE"), default=float("nan"))
        rows[name] = {"best": best, "epochs": sum(len(t.intermediate_values) for t in trials),
                      "pruned": sum(t.state.name == "PRUNED" for t in trials), "trials": len(trials)}

    print(f"\npruning efficiency: sweeps/quick.yaml + trainer.lr, {args.trials} trials, random sampler seed "
          f"{args.seed}, demo data {args.per_class}/class at {args.image_size}px, "
          f"{args.epochs}+{args.finetune_epochs} epochs per trial, pruner {args.pruner}")
    print(f"{'run':<10}{'best val_accuracy':>19}{'epochs trained':>16}{'pruned trials':>15}{'wall s':>9}")
    for name, row in rows.items():
        print(f"{name:<10}{row['best']:>19.4f}{row['epochs']:>16d}{row['pruned']:>11d}/{row['trials']:<3d}"
              f"{seconds[name]:>9.0f}")
    base, fast = rows["unpruned"], rows["pruned"]
    gap = 100 * (base["best"] - fast["best"])
    share = fast["epochs"] / max(base["epochs"], 1)
    verdict = "met" if gap <= 0.5 and share <= 0.4 else "NOT met"
    print(f"pruned vs unpruned: {gap:+.2f} accuracy points below, {100 * share:.0f}% of the epochs "
          f"(goal: <= 0.5 points, <= 40%: {verdict})")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
