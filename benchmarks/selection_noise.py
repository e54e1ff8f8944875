"""Selection noise: how often the configuration a sweep picks is still the best on the test split, when
the same compute is spent on one split, on repeated seeds, or on cross-validation.

A sweep picks its winner on one validation split. With a few hundred or thousand validation images, the
difference between the top configurations is often smaller than what the split can resolve, and the
"winner" is then partly chosen by which images happened to land in the split. Repeating each trial over
seeds (``hydra.sweeper.repeats=3``) or cross-validating it (``data.cv.folds=3``) scores a configuration
more reliably, but at the same budget it can try a third as many. This benchmark measures the trade on
real cells: a pool of B configurations close to each other (as a sweep's top is), and per split seed
three arms of B training runs each, every one a real grid sweep (``python -m bloodcell.train -m``):

* ``single``: all B configurations of the pool, trained once each; score = ``best_val_accuracy`` on the
  seed's one validation split (what a sweep does by default).
* ``repeats``: B/3 configurations x 3 seeds (``hydra.sweeper.repeats=3``, same split); score = the mean.
* ``cv``: B/3 configurations x 3 folds (``data.cv.folds=3`` of the seed's train + validation pool); score
  = the mean over the folds.

Which B/3 configurations the smaller arms train is a fair draw, not the best: the grid sampler's own
seeded shuffle of the pool (``hydra.sweeper.sampler.seed`` = the split seed), so for one split seed the
repeats and CV arms draw the same configurations, and another seed draws others. Every arm's pick is
judged on the same test split of that seed, against the test accuracies of all B configurations (the
single arm's runs, which exist for every configuration of the pool): whether the pick is the test winner
of the whole pool, whether it is the test winner of what the arm drew (its scoring was right, the
winner may not have been drawn), whether it is statistically tied with the test winner (McNemar on the
test images, p >= 0.05), and the regret (test accuracy of the test winner minus the pick's, in points).
The report prints each arm's compute (the summed run time of its trials, seconds): the budget is the
same number of training runs, and the seconds show it is about the same time. For the single arm it
also prints how many configurations the validation split itself could not separate from its pick (the
sweep report's ``tied_with_best``) and the share of paired bootstrap resamples of the validation and
test images in which the two winners agree.

Measured (the defaults, 2026-12-02, the shared 2-core CPU at load 5-8: 36 runs, 4,952 s = 83 min): the
pool's single-run test accuracies were 0.783-0.870 on split 0 and 0.823-0.856 on split 1. ``single``
picked the test winner on 2 of 2 splits (regret 0.00 points; 1,644 s of training), though its validation
split could not separate the pick from 1 and 2 others and paired bootstrap resamples kept the same winner
on both splits only 83% and 59% of the time. ``repeats`` and ``cv`` drew the same configurations (c1, c5
on split 0; c1, c3 on split 1) and picked alike: the test winner on 1 of 2 (tied with it on 1, mean
regret 2.70 points; 1,652 s and 1,379 s). On split 0 the draw missed the winner c0 (5.4 points above the
pick on test), and both scored c1 above c5, which the test split cannot separate (McNemar p = 0.60); on
split 1 both drew and picked the winner c3. At this budget the loss came from trying a third as many
configurations, not from the scoring. Two splits are a coarse estimate: one more split could move any
count by one.

    python benchmarks/selection_noise.py                        # as measured (docs/sweeps.md): B=6, seeds 0 1
    python benchmarks/selection_noise.py --seeds 0 1 2 3          # more splits, a finer estimate
    python benchmarks/selection_noise.py --configs 3              # B = 3: one configuration per smaller arm
    python benchmarks/selection_noise.py --report-only            # figures from runs already made

Every run is a real training on ``data/training_set.npz`` (the 13,659 real cells of ``../shared/data/pbc96``,
``python ../shared/data/build_training_set.py data/training_set.npz``; ``--data`` takes that folder too)
with the shared ImageNet MobileNet, ``experiment=mobilenet_cpu`` cut to CPU size: a stratified subset,
96 px input, 1 head epoch and 6 fine-tuning, no TTA, no Grad-CAM, no model logged. Validation and test
fractions are equal, so a fold of the 3-fold CV trains on as many images as a single run, and phase-1
reuse is off (it would spare the single arm's phase 1 of configurations that differ only in the
fine-tuning rate): the arms' runs cost the same.
The MLflow store and the Optuna journal go to benchmarks/results/selection_noise/ (git-ignored); the
studies are named by arm, split seed and a digest of the training settings, so a finished study is
reused (runs nothing), an interrupted one continues where it stopped (the sweeper's resume), and runs
made with other settings are never mixed in.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: the pool: fine-tuning learning rate x augmentation strength around the mobilenet_cpu preset (a grid,
#: so that the first 3 or all 6 are a grid sweep's search space)
LRS = ("4e-4", "6e-4")
STRENGTHS = ("0.25", "0.5", "0.75")
CONFIGS: dict[str, dict[str, str]] = {
    f"c{i}": {"finetune.lr": lr, "augmentation.strength": strength}
    for i, (lr, strength) in enumerate((lr, strength) for lr in LRS for strength in STRENGTHS)
}
#: arm -> (trainings per configuration, the sweep overrides that make them)
ARMS: dict[str, tuple[int, list[str]]] = {
    "single": (1, []),
    "repeats": (3, ["hydra.sweeper.repeats=3"]),
    "cv": (3, ["data.cv.folds=3"]),
}
EXPERIMENT = "selection_noise"
GROUP_TAG = "bloodcell.group"  # bloodcell.tracking.members.GROUP_TAG, without importing MLflow early
ALPHA = 0.05
RESAMPLES = 1000


def train_overrides(args: argparse.Namespace) -> list[str]:
    """The training settings every run of every arm shares."""
    data = Path(args.data)
    return [
        "+experiment=mobilenet_cpu",
        "data=folder" if data.is_dir() else "data=npz",
        f"data.path={data}",
        f"data.limit={args.limit}",
        f"data.val_fraction={args.val_fraction}",
        f"data.test_fraction={args.test_fraction}",
        f"backbone.input_size={args.input_size}",
        f"trainer.epochs={args.epochs}",
        f"finetune.epochs={args.finetune_epochs}",
        f"finetune.lr_decay_steps={args.decay_steps}",
        "trainer.test_tta=false",
        "trainer.reuse_phase1=false",  # every arm pays for its phase 1s: the same runs cost the same
        "trainer.verbose=0",
        "tracking.log_model=false",
        "tracking.explain=false",
    ]


def pool(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """The first ``--configs`` configurations: the pool, and the budget B of each arm per split seed."""
    names = dict(list(CONFIGS.items())[: args.configs])
    if len(names) % 3 or len({c["finetune.lr"] for c in names.values()}) * len(STRENGTHS) != len(names):
        raise SystemExit(f"--configs {args.configs}: use 3 or 6 (a grid, split 3 ways by the other arms)")
    return names


def study(args: argparse.Namespace, arm: str, seed: int) -> str:
    """The arm's study on ``seed``'s split, named by a digest of the settings (never reuse other runs)."""
    digest = hashlib.sha256(" ".join([*train_overrides(args), *pool(args)]).encode()).hexdigest()[:8]
    return f"selection-{arm}-s{seed}-{digest}"


def sweep(args: argparse.Namespace, arm: str, seed: int) -> float:
    """The arm's grid sweep on ``seed``'s split: B / (trainings per configuration) points of the pool in
    the grid sampler's seeded order; a study already complete runs nothing. Returns the seconds."""
    per_point, overrides = ARMS[arm]
    names = pool(args)
    lrs = sorted({c["finetune.lr"] for c in names.values()}, key=float)
    command = [sys.executable, "-m", "bloodcell.train", "-m", *train_overrides(args),
               f"tracking.experiment={EXPERIMENT}", f"tracking.uri=sqlite:///{args.out / 'mlflow.db'}",
               "hydra/sweeper=bloodcell_optuna", f"hydra.sweeper.study_name={study(args, arm, seed)}",
               f"hydra.sweeper.storage=journal:{args.out / 'optuna.journal'}",
               "hydra.sweeper.sampler.name=grid", f"hydra.sweeper.sampler.seed={seed}",
               f"hydra.sweeper.n_trials={len(names) // per_point}", "hydra.sweeper.pruner.name=none",
               f"hydra.sweep.dir={args.out / 'multirun' / study(args, arm, seed)}",
               f"finetune.lr=choice({','.join(lrs)})", f"augmentation.strength=choice({','.join(STRENGTHS)})",
               f"seed={seed}", *overrides]  # fmt: skip
    print(f"sweeping {study(args, arm, seed)}: {len(names) // per_point} x {per_point}", flush=True)
    tic = time.perf_counter()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    if proc.returncode != 0:
        raise SystemExit(f"{study(args, arm, seed)} failed:\n{proc.stderr[-3000:]}")
    print(f"  {seconds:.0f} s", flush=True)
    return seconds


# ---- what the arms trained ----------------------------------------------------------------------------


@dataclass
class Trained:
    """One configuration trained once on one seed's split (a single-arm trial): its figures and
    predictions, which judge every arm's pick on that seed's test split."""

    name: str
    best_val_accuracy: float
    test_accuracy: float
    val_right: np.ndarray  # per validation image: right or not
    test_right: np.ndarray


@dataclass
class ArmRuns:
    """One arm on one split seed: the selection score of each configuration it trained, and the summed
    run time of its trials (seconds)."""

    scores: dict[str, float]
    seconds: float


def config_of(params: dict[str, str], names: dict[str, dict[str, str]]) -> str | None:
    return next(
        (n for n, c in names.items() if all(float(params.get(k, "nan")) == float(v) for k, v in c.items())),
        None,
    )


def trial_runs(client: Any, args: argparse.Namespace, arm: str, seed: int) -> list[Any]:
    """The FINISHED trial runs of the arm's study: a single run per trial, or the group run of its repeats
    (folds); not the sweep's parent run, not the members."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    query = f"tags.optuna_study = '{study(args, arm, seed)}' and attributes.status = 'FINISHED'"
    runs = client.search_runs([exp.experiment_id], query, max_results=1000)
    grouped = arm != "single"
    return [r for r in runs if "trial_number" in r.data.tags and (GROUP_TAG in r.data.tags) == grouped]


def load_arm(client: Any, args: argparse.Namespace, arm: str, seed: int) -> ArmRuns:
    score = "best_val_accuracy" if arm == "single" else "val_accuracy_mean"
    scores, seconds = {}, 0.0
    for run in trial_runs(client, args, arm, seed):
        name = config_of(run.data.params, pool(args))
        if name is not None and score in run.data.metrics:
            scores[name] = run.data.metrics[score]
            seconds += (run.info.end_time - run.info.start_time) / 1000
    return ArmRuns(scores, seconds)


def load_pool(client: Any, args: argparse.Namespace, seed: int) -> dict[str, Trained]:
    """The single arm's runs of ``seed`` with their stored predictions, by configuration name."""
    from bloodcell.evaluation.stored_predictions import stored_predictions

    out = {}
    for run in trial_runs(client, args, "single", seed):
        name = config_of(run.data.params, pool(args))
        val = stored_predictions(client, run.info.run_id, "val")
        test = stored_predictions(client, run.info.run_id, "test")
        if name is None or val is None or test is None:
            continue
        metrics = run.data.metrics
        out[name] = Trained(
            name,
            metrics["best_val_accuracy"],
            metrics["test_accuracy"],
            val.predicted == val.labels,
            test.predicted == test.labels,
        )
    return out


# ---- the figures ------------------------------------------------------------------------------------


def _best(scores: dict[str, float]) -> str:
    return max(scores, key=lambda name: (scores[name], -int(name[1:])))  # ties: the first config


def outcome(trained: dict[str, Trained], arm: ArmRuns) -> dict[str, float]:
    """The arm's pick judged on the test split, against the test winner of the whole pool."""
    from bloodcell.evaluation import stats

    test = {name: r.test_accuracy for name, r in trained.items()}
    pick, winner = _best(arm.scores), _best(test)
    best_drawn = _best({name: test[name] for name in arm.scores})
    p = stats.mcnemar(trained[pick].test_right, trained[winner].test_right).p_value
    return {
        "pick": float(pick[1:]),
        "test_winner": float(winner[1:]),
        "winner_drawn": float(winner in arm.scores),
        "best_of_drawn": float(pick == best_drawn),
        "same": float(pick == winner),
        "tied_on_test": float(pick == winner or p >= ALPHA),
        "regret_points": 100 * (test[winner] - test[pick]),
        "seconds": arm.seconds,
    }


def single_split_noise(trained: dict[str, Trained], rng: np.random.Generator) -> tuple[int, float]:
    """How many configurations the validation split cannot separate from its winner (McNemar, Holm), and
    the share of paired bootstrap resamples of both splits in which the two winners agree."""
    from bloodcell.evaluation import stats

    runs = list(trained.values())
    pick = trained[_best({n: r.best_val_accuracy for n, r in trained.items()})]
    others = [r for r in runs if r.name != pick.name]
    val_p = stats.holm([stats.mcnemar(pick.val_right, r.val_right).p_value for r in others])
    val = np.stack([r.val_right for r in runs]).astype(float)
    test = np.stack([r.test_right for r in runs]).astype(float)
    agree = 0
    for _ in range(RESAMPLES):
        v = val[:, rng.integers(0, val.shape[1], val.shape[1])].mean(axis=1)
        t = test[:, rng.integers(0, test.shape[1], test.shape[1])].mean(axis=1)
        agree += int(np.argmax(v) == np.argmax(t))
    return sum(p >= ALPHA for p in val_p), agree / RESAMPLES


def _yes(flag: float) -> str:
    return "yes" if flag else "no"


def report(client: Any, args: argparse.Namespace) -> None:
    names = pool(args)
    rng = np.random.default_rng(0)
    trained = {seed: load_pool(client, args, seed) for seed in args.seeds}
    seeds = [seed for seed in args.seeds if len(trained[seed]) == len(names)]
    if not seeds:
        print("no split seed has all its configurations trained yet")
        return
    some = next(iter(trained[seeds[0]].values()))
    print(f"\npool of {len(names)} configurations = a budget of {len(names)} training runs per arm and "
          f"split; split seeds {', '.join(map(str, seeds))}; validation {len(some.val_right)} images, "
          f"test {len(some.test_right)}\n")  # fmt: skip
    for name, config in names.items():
        print(f"{name}: {' '.join(f'{k}={v}' for k, v in config.items())}")
    header = "  ".join(f"{n:>13}" for n in names)
    print(f"\nseed  {header}   (single run: best_val_accuracy / test_accuracy)")
    for seed in seeds:
        cells = {n: f"{r.best_val_accuracy:.4f}/{r.test_accuracy:.4f}" for n, r in trained[seed].items()}
        tied, agree = single_split_noise(trained[seed], rng)
        row = "  ".join(f"{cells[n]:>13}" for n in names)
        print(f"{seed:>4}  {row}   val ties {tied} with its pick; bootstrap: same winner {agree:.2f}")
    for arm, (per_point, _) in ARMS.items():
        rows = []
        for seed in seeds:
            runs, wanted = load_arm(client, args, arm, seed), len(names) // per_point
            if len(runs.scores) < wanted:
                print(f"\narm {arm}, seed {seed}: {len(runs.scores)} of {wanted} trials done")
                continue
            rows.append((seed, sorted(runs.scores), outcome(trained[seed], runs)))
        if not rows:
            continue
        print(f"\narm {arm} ({len(names) // per_point} configurations x {per_point}):")
        print("seed  drawn              pick  test winner  winner drawn  best of drawn  same  "
              "tied on test (McNemar)  regret (points)  compute (s)")  # fmt: skip
        for seed, drawn, o in rows:
            print(f"{seed:>4}  {','.join(drawn):<17}  c{o['pick']:.0f}    c{o['test_winner']:.0f}          "
                  f"{_yes(o['winner_drawn']):<12}  {_yes(o['best_of_drawn']):<13}  {_yes(o['same']):<4}  "
                  f"{_yes(o['tied_on_test']):<22}  {o['regret_points']:>15.2f}  "
                  f"{o['seconds']:>11.0f}")  # fmt: skip
        total = {k: float(np.sum([o[k] for _, _, o in rows])) for k in rows[0][2]}
        print(f"all   the pick is the test winner on {total['same']:.0f} of {len(rows)} splits, tied with it "
              f"on {total['tied_on_test']:.0f}; mean regret {total['regret_points'] / len(rows):.2f} points; "
              f"{total['seconds']:.0f} s of training")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "training_set.npz"), help="npz or pbc96 folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="split seeds")
    parser.add_argument("--configs", type=int, default=len(CONFIGS), help="B: the first B of CONFIGS")
    parser.add_argument("--limit", type=int, default=4000, help="stratified subset of the cells")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=1, help="head epochs (backbone frozen)")
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--decay-steps", type=int, default=32, help="about one epoch of 2,000 images")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "selection_noise")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    pool(args)  # refuses a pool that is not a grid before anything trains
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{args.out / 'mlflow.db'}")
    tic = time.perf_counter()
    wall: dict[str, float] = {}
    if not args.report_only:
        for seed in args.seeds:  # one seed at a time: a stopped benchmark leaves whole seeds to report
            for arm in args.arms:
                wall[arm] = wall.get(arm, 0.0) + sweep(args, arm, seed)
    report(client, args)
    sweeps = "".join(f", {arm} {seconds:.0f} s" for arm, seconds in wall.items())
    print(f"\nsweep processes this time{sweeps or ': none'}; all in {time.perf_counter() - tic:.0f} s")


if __name__ == "__main__":
    main()
