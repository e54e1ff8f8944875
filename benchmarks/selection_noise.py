"""Selection noise: how often the configuration a validation split picks is still the best on the test split.

A sweep picks its winner on one validation split. With a few hundred or thousand validation images, the
difference between the top configurations is often smaller than what the split can resolve, and the
"winner" is then partly chosen by which images happened to land in the split. This benchmark measures it
on real cells: K fixed configurations (a small sweep's worth, close to each other, as a sweep's top is)
are trained on S different splits (seeds); for each split, the configuration the *selection arm* picks
is checked against the test split of the same seed.

Measured (``--configs 3``, 2026-12-02, the shared 2-core CPU under load): the pick was the test winner on
3 of 3 splits, but the winning configuration changed with the seed (c0, c1, c0) and the paired bootstrap
kept the same winner on both splits 92%, 71% and 90% of the time; 9 runs of 133-413 s.

    python benchmarks/selection_noise.py --configs 3                      # as measured (README): 3 x 3 seeds
    python benchmarks/selection_noise.py                                  # all 6 configs x 3 seeds
    python benchmarks/selection_noise.py --seeds 0 1 2 3 4 --limit 6000    # more splits, more cells
    python benchmarks/selection_noise.py --report-only                    # figures from runs already made
    python benchmarks/selection_noise.py --configs 3 --arms repeats cv    # also the repeats and CV arms

Arms (how a configuration is picked):

* ``single`` (measured): the sweep's rule, the best ``best_val_accuracy`` on one validation split.
* ``repeats`` (``--arms repeats``): the configurations as a grid sweep with ``hydra.sweeper.repeats=3``
  on the same seed's split; the score is each trial's mean over its 3 seeds (``val_accuracy_mean`` of
  the trial's run).
* ``cv`` (``--arms cv``): the same grid sweep with ``data.cv.folds=3`` (3-fold cross-validation of that
  seed's train + validation pool); the score is the mean over the folds.

Each arm is a function from the trained runs to a selection score per configuration (``ARMS``); the test
side is shared (the single runs' test split, which the repeats and folds of the same seed hold out too),
so the figures below are computed for every arm that has its scores (the columns "configs tied with pick
on val" and "bootstrap" use the single runs' validation predictions for every arm). Both extra arms train each
configuration 3 times: they cost 3x the single arm's compute, which the report prints (seconds per arm);
the budget is not equalised.

Per split it reports whether the pick is the test winner, whether it is statistically tied with the test
winner on the test split (McNemar, p >= 0.05), the regret (test accuracy of the test winner minus the
pick's, in points), how many configurations the validation split itself could not separate from its pick
(the sweep report's ``tied_with_best``), and, from the stored predictions, the share of paired bootstrap
resamples of the validation and test images in which the two winners agree: the chance that the same
trained models, shown other images of the same sizes, keep the pick.

Every run is a real ``python -m bloodcell.train`` on ``../shared/data/pbc96`` (the shared ImageNet
MobileNet, ``experiment=mobilenet_cpu`` cut to CPU size: a stratified subset, 96 px input, 2 head epochs
and 4 fine-tuning, no TTA, no model logged). The MLflow store goes to
benchmarks/results/selection_noise/ (git-ignored); runs already FINISHED there are reused, so an
interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: K configurations around the mobilenet_cpu preset: fine-tuning learning rate x augmentation strength
CONFIGS: dict[str, list[str]] = {
    f"c{i}": [f"finetune.lr={lr}", f"augmentation.strength={strength}"]
    for i, (lr, strength) in enumerate(
        (lr, strength) for lr in ("3e-4", "1e-3") for strength in ("0.25", "0.5", "0.75")
    )
}
EXPERIMENT = "selection_noise"
ALPHA = 0.05
RESAMPLES = 1000


def train_overrides(args: argparse.Namespace) -> list[str]:
    return [
        "+experiment=mobilenet_cpu",
        "data=folder",
        f"data.path={args.data}",
        f"data.limit={args.limit}",
        f"data.val_fraction={args.val_fraction}",
        f"data.test_fraction={args.test_fraction}",
        f"backbone.input_size={args.input_size}",
        f"trainer.epochs={args.epochs}",
        f"finetune.epochs={args.finetune_epochs}",
        f"finetune.lr_decay_steps={args.decay_steps}",
        "trainer.test_tta=false",
        "trainer.verbose=0",
        "tracking.log_model=false",
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.uri=sqlite:///{args.out / 'mlflow.db'}",
    ]


def finished(client, name: str):
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        f"attributes.run_name = '{name}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0] if runs else None


def configs(args: argparse.Namespace) -> dict[str, list[str]]:
    return dict(list(CONFIGS.items())[: args.configs])


def arm_study(arm: str, seed: int) -> str:
    return f"selection-{arm}-s{seed}"


def sweep_arm(args: argparse.Namespace, arm: str, seed: int) -> float:
    """The configurations as a grid sweep of repeated (``repeats``) or cross-validated (``cv``) trials on
    ``seed``'s split; a study already complete runs nothing (n_trials is its total). Returns the seconds."""
    names = configs(args)
    lrs = sorted({o.split("=")[1] for name in names for o in CONFIGS[name] if o.startswith("finetune.lr=")})
    strengths = sorted(
        {o.split("=")[1] for name in names for o in CONFIGS[name] if o.startswith("augmentation.strength=")}
    )
    if len(lrs) * len(strengths) != len(names):
        raise SystemExit(f"--arms {arm}: the first {len(names)} configs are not a grid; use --configs 3 or 6")
    per_point = "hydra.sweeper.repeats=3" if arm == "repeats" else "data.cv.folds=3"
    command = [sys.executable, "-m", "bloodcell.train", "-m", *train_overrides(args),
               "hydra/sweeper=bloodcell_optuna", f"hydra.sweeper.study_name={arm_study(arm, seed)}",
               f"hydra.sweeper.storage=journal:{args.out / 'optuna.journal'}",
               "hydra.sweeper.sampler.name=grid", f"hydra.sweeper.n_trials={len(names)}",
               "hydra.sweeper.pruner.name=none",
               f"hydra.sweep.dir={args.out / 'multirun' / arm_study(arm, seed)}",
               f"finetune.lr=choice({','.join(lrs)})", f"augmentation.strength=choice({','.join(strengths)})",
               f"seed={seed}", per_point]  # fmt: skip
    print(f"sweeping {arm_study(arm, seed)}: {per_point}", flush=True)
    tic = time.perf_counter()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{arm_study(arm, seed)} failed:\n{proc.stderr[-3000:]}")
    print(f"  {time.perf_counter() - tic:.0f} s", flush=True)
    return time.perf_counter() - tic


def arm_scores(client, args: argparse.Namespace, arm: str, seed: int) -> dict[str, float]:
    """Configuration name -> the mean objective of its FINISHED repeated / cross-validated trial run."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return {}
    query = f"tags.optuna_study = '{arm_study(arm, seed)}' and attributes.status = 'FINISHED'"
    scores = {}
    for run in client.search_runs([exp.experiment_id], query, max_results=100):
        if "val_accuracy_mean" not in run.data.metrics:
            continue
        params = run.data.params
        for name in configs(args):
            wanted = dict(o.split("=", 1) for o in CONFIGS[name])
            if all(float(params[k]) == float(v) for k, v in wanted.items()):
                scores[name] = run.data.metrics["val_accuracy_mean"]
    return scores


def train_all(args: argparse.Namespace, client) -> float:
    """Every configuration on every seed (skipping runs already FINISHED); returns the seconds spent."""
    spent = 0.0
    for seed in args.seeds:
        for name, overrides in configs(args).items():
            run_name = f"{name}-s{seed}"
            if finished(client, run_name) is not None:
                continue
            command = [sys.executable, "-m", "bloodcell.train", *train_overrides(args), *overrides,
                       f"seed={seed}", f"tracking.run_name={run_name}"]  # fmt: skip
            print(f"training {run_name}: {' '.join(overrides)}", flush=True)
            tic = time.perf_counter()
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            spent += time.perf_counter() - tic
            if proc.returncode != 0:
                raise SystemExit(f"{run_name} failed:\n{proc.stderr[-3000:]}")
            print(f"  {time.perf_counter() - tic:.0f} s", flush=True)
    for arm in args.arms:
        for seed in args.seeds:
            args.seconds[arm] = args.seconds.get(arm, 0.0) + sweep_arm(args, arm, seed)
    return spent


@dataclass
class Trained:
    """One configuration trained on one seed's split: its figures and stored predictions."""

    name: str
    seed: int
    best_val_accuracy: float
    test_accuracy: float
    val_right: np.ndarray  # per validation image: right or not
    test_right: np.ndarray
    #: arm -> this configuration's selection score from that arm's runs on this seed (repeats, cv)
    arm_scores: dict[str, float] = field(default_factory=dict)


def load(client, args: argparse.Namespace) -> dict[int, list[Trained]]:
    from bloodcell.compare import stored_predictions

    out: dict[int, list[Trained]] = {}
    for seed in args.seeds:
        for name in configs(args):
            run = finished(client, f"{name}-s{seed}")
            if run is None:
                continue
            val = stored_predictions(client, run.info.run_id, "val")
            test = stored_predictions(client, run.info.run_id, "test")
            assert val is not None and test is not None
            scores = {arm: arm_scores(client, args, arm, seed) for arm in ("repeats", "cv")}
            out.setdefault(seed, []).append(
                Trained(
                    name,
                    seed,
                    run.data.metrics["best_val_accuracy"],
                    run.data.metrics["test_accuracy"],
                    val.predicted == val.labels,
                    test.predicted == test.labels,
                    {arm: by_name[name] for arm, by_name in scores.items() if name in by_name},
                )  # fmt: skip
            )
    return out


# ---- selection arms: trained runs of one seed -> a selection score per configuration ------------------


def single_split(runs: list[Trained]) -> dict[str, float]:
    """What a sweep does today: the best epoch's validation accuracy on the one split."""
    return {r.name: r.best_val_accuracy for r in runs}


def from_arm(arm: str) -> Callable[[list[Trained]], dict[str, float]]:
    """The mean over the repeats (folds) of each configuration's trial in the arm's sweep of this seed."""

    def scores(runs: list[Trained]) -> dict[str, float]:
        missing = [r.name for r in runs if arm not in r.arm_scores]
        if missing:
            raise NotImplementedError(
                f"no finished {arm} trial for {', '.join(missing)}: run with --arms {arm}"
            )
        return {r.name: r.arm_scores[arm] for r in runs}

    return scores


ARMS: dict[str, Callable[[list[Trained]], dict[str, float]]] = {
    "single": single_split,
    "repeats": from_arm("repeats"),
    "cv": from_arm("cv"),
}


# ---- the figures ------------------------------------------------------------------------------------


def _pick(scores: dict[str, float]) -> str:
    return max(scores, key=lambda name: (scores[name], -int(name[1:])))  # ties: the first config


def outcome(runs: list[Trained], scores: dict[str, float], rng: np.random.Generator) -> dict[str, float]:
    from bloodcell import stats

    by_name = {r.name: r for r in runs}
    pick = _pick(scores)
    test_winner = _pick({r.name: r.test_accuracy for r in runs})
    test_p = stats.mcnemar(by_name[pick].test_right, by_name[test_winner].test_right).p_value
    others = [r for r in runs if r.name != pick]
    val_p = stats.holm([stats.mcnemar(by_name[pick].val_right, r.val_right).p_value for r in others])
    # paired bootstrap of both splits: do the two winners still agree on other images of the same sizes?
    val = np.stack([r.val_right for r in runs]).astype(float)
    test = np.stack([r.test_right for r in runs]).astype(float)
    agree = 0
    for _ in range(RESAMPLES):
        v = val[:, rng.integers(0, val.shape[1], val.shape[1])].mean(axis=1)
        t = test[:, rng.integers(0, test.shape[1], test.shape[1])].mean(axis=1)
        agree += int(np.argmax(v) == np.argmax(t))
    return {
        "pick": float(int(pick[1:])),
        "test_winner": float(int(test_winner[1:])),
        "same": float(pick == test_winner),
        "tied_on_test": float(pick == test_winner or test_p >= ALPHA),
        "regret_points": 100 * (by_name[test_winner].test_accuracy - by_name[pick].test_accuracy),
        "tied_on_val": float(sum(p >= ALPHA for p in val_p)),
        "bootstrap_same": agree / RESAMPLES,
    }


def report(results: dict[int, list[Trained]], names: list[str]) -> None:
    rng = np.random.default_rng(0)
    seeds = sorted(s for s, runs in results.items() if len(runs) == len(names))
    if not seeds:
        print("no seed has all its configurations trained yet")
        return
    some = results[seeds[0]][0]
    print(f"\n{len(names)} configurations x {len(seeds)} seeds; validation {len(some.val_right)} images, "
          f"test {len(some.test_right)} images per split\n")  # fmt: skip
    print("seed  " + "  ".join(f"{n:>13}" for n in names) + "   (best_val_accuracy / test_accuracy)")
    for seed in seeds:
        cells = {r.name: f"{r.best_val_accuracy:.4f}/{r.test_accuracy:.4f}" for r in results[seed]}
        print(f"{seed:>4}  " + "  ".join(f"{cells[n]:>13}" for n in names))
    for arm, scores_of in ARMS.items():
        try:
            rows = [(seed, outcome(results[seed], scores_of(results[seed]), rng)) for seed in seeds]
        except NotImplementedError as err:
            print(f"\narm {arm}: not measured ({err})")
            continue
        print(f"\narm {arm}:")
        print("seed  pick  test winner  same  tied on test (McNemar)  regret (points)  "
              "configs tied with pick on val  bootstrap: same winner")  # fmt: skip
        for seed, o in rows:
            same, tied = ("yes" if o["same"] else "no"), ("yes" if o["tied_on_test"] else "no")
            print(
                f"{seed:>4}  c{o['pick']:.0f}    c{o['test_winner']:.0f}          {same:<4}  {tied:<22}  "
                f"{o['regret_points']:>15.2f}  {o['tied_on_val']:>29.0f}  {o['bootstrap_same']:>22.2f}"
            )
        mean = {k: float(np.mean([o[k] for _, o in rows])) for k in rows[0][1]}
        n_same = sum(o["same"] for _, o in rows)
        n_tied = sum(o["tied_on_test"] for _, o in rows)
        print(
            f"all   the pick is the test winner on {n_same:.0f} of {len(rows)} splits, tied with it on "
            f"{n_tied:.0f}; mean regret {mean['regret_points']:.2f} points; bootstrap: same winner "
            f"{mean['bootstrap_same']:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbc96"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", type=int, default=len(CONFIGS), help="the first N of CONFIGS")
    parser.add_argument("--limit", type=int, default=4000, help="stratified subset of the cells")
    parser.add_argument("--val-fraction", type=float, default=0.3)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=2, help="head epochs (backbone frozen)")
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--decay-steps", type=int, default=25, help="about one epoch of 1,600 images")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "selection_noise")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--arms", nargs="*", default=[], choices=["repeats", "cv"], help="also train these")
    args = parser.parse_args()
    args.seconds = {}
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{args.out / 'mlflow.db'}")
    tic = time.perf_counter()
    spent = 0.0 if args.report_only else train_all(args, client)
    for name, overrides in configs(args).items():
        print(f"{name}: {' '.join(overrides)}")
    report(load(client, args), list(configs(args)))
    arms = "".join(f", arm {arm} {seconds:.0f} s" for arm, seconds in args.seconds.items())
    print(f"\ntraining {spent:.0f} s (single){arms}; benchmark {time.perf_counter() - tic:.0f} s in all")


if __name__ == "__main__":
    main()
