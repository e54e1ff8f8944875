"""What a sweep trial pays outside Keras' fit (issue 29): seconds per trial of a real sweep, split into the
parts each trial's MLflow run logs (``time/seconds_*``) and what the sweep itself costs between trials
(process start, imports, Hydra's job set-up, the sampler, the store connections, the child run's start
and end), with the code of another git commit side by side in the same run.

    python benchmarks/trial_overhead.py                      # 6 trials, this checkout
    python benchmarks/trial_overhead.py --baseline 8e4e177   # and the same sweep with that commit's code

The sweep is ``sweeps/finetune.yaml`` on the mobilenet_cpu preset cut to CPU size (as in
benchmarks/sweep_compute.py): ``--limit`` real cells from ../shared/data/pbc96 (written once as an npz),
96 px, 1 + 1 epochs, phase-1 reuse off (every trial trains both phases), the basic launcher (trials one
after another in the sweep's process: what a trial pays, not what parallel trials hide). Each arm starts
from empty stores. Prints per arm: wall seconds, seconds in fit, and per trial the seconds outside fit,
by part. Machines here are shared: run it twice, on an idle machine.
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


def run_sweep(code: Path, folder: Path, args: argparse.Namespace, data: Path) -> float:
    """The sweep with the code in ``code`` (a checkout), its stores in ``folder``; returns wall seconds."""
    folder.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "bloodcell.train",
        "-m",
        "+sweeps=finetune",
        "experiment=mobilenet_cpu",
        "hydra.sweeper.study_name=overhead",
        f"hydra.sweeper.storage=sqlite:///{folder / 'optuna.db'}",
        f"hydra.sweeper.n_trials={args.trials}",
        f"hydra.sweep.dir={folder / 'multirun'}",
        "trainer.reuse_phase1=false",
        "data=npz",
        f"data.path={data}",
        "backbone.input_size=96",
        "trainer.epochs=1",
        "finetune.epochs=1",
        "trainer.time_limit_minutes=null",
        "trainer.test_tta=false",
        "trainer.verbose=0",
        f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",
    ]
    # the checkout's own package first (python -m puts the working directory first on the path)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(code)}
    tic = time.perf_counter()
    with open(folder / "sweep.log", "w") as log:
        proc = subprocess.run(command, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"the sweep in {folder} failed (exit {proc.returncode}); see {folder / 'sweep.log'}")
    return time.perf_counter() - tic


def trial_parts(folder: Path) -> list[dict[str, float]]:
    """Each trial run's ``time/seconds_*`` metrics (the sweep's parent run has none)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    prefix = "time/seconds_"
    parts = [
        {k[len(prefix) :]: v for k, v in run.data.metrics.items() if k.startswith(prefix)} for run in runs
    ]
    return [p for p in parts if "fit" in p]


def summary(name: str, wall: float, trials: list[dict[str, float]]) -> dict[str, Any]:
    n = len(trials)
    mean = {key: sum(t.get(key, 0.0) for t in trials) / n for key in sorted({k for t in trials for k in t})}
    fit = sum(t["fit"] for t in trials)
    row = {"name": name, "trials": n, "wall": wall, "fit": fit, "outside": (wall - fit) / n}
    row["between"] = (wall - sum(t["in_train"] for t in trials)) / n  # sweep, process, Hydra, run end
    row["in_run"] = mean["in_train"] - mean["fit"]
    return row | {f"part_{k}": v for k, v in mean.items() if k not in ("in_train", "fit")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--limit", type=int, default=2000, help="real cells sampled from pbc96")
    ap.add_argument("--baseline", help="a git commit whose code runs the same sweep first")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from sweep_compute import cells  # the same real cells, written once

    out = args.out = args.out or ROOT / "benchmarks" / "results" / time.strftime(
        "trial_overhead_%Y%m%d-%H%M%S"
    )
    out.mkdir(parents=True, exist_ok=True)
    data = cells(args)
    rows = []
    if args.baseline:
        from baseline import checkout

        with checkout(args.baseline) as code:
            wall = run_sweep(code, out / "baseline", args, data)
        rows.append(summary(f"baseline {args.baseline}", wall, trial_parts(out / "baseline")))
    wall = run_sweep(ROOT, out / "current", args, data)
    rows.append(summary("this checkout", wall, trial_parts(out / "current")))

    print(
        f"{args.trials} trials of sweeps/finetune.yaml, mobilenet_cpu 96 px, {args.limit} cells, 1+1 epochs",
    )
    parts = sorted({k for r in rows for k in r if k.startswith("part_")})
    print(f"{'':34}" + "".join(f"{str(r['name'])[:22]:>24}" for r in rows))
    lines = [
        ("sweep wall s", "wall"),
        ("seconds in fit, all trials", "fit"),
        ("per trial outside fit s", "outside"),
        ("  inside the run (not fit) s", "in_run"),
        *((f"    {k[len('part_') :]} s", k) for k in parts),
        ("  between runs s", "between"),
    ]
    for label, key in lines:
        print(f"{label:<34}" + "".join(f"{r.get(key, 0.0):>24.1f}" for r in rows))
    if len(rows) == 2:
        before, after = rows
        print(
            f"per trial outside fit: {before['outside']:.1f} s -> {after['outside']:.1f} s "
            f"({after['outside'] / before['outside'] - 1:+.0%})"
        )


if __name__ == "__main__":
    main()
