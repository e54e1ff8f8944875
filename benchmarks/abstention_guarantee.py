"""Does a review threshold keep its promise on cells it was not chosen on? Over many random
calibration/check splits of the cells a trained run never trained on (its stored validation and test
predictions: nothing is trained or predicted again), per target accuracy:

- the guaranteed thresholds (`bloodcell.evaluation.abstention.guaranteed_threshold`, Learn then Test at
  the stated confidence) chosen on the calibration part: for any batch of at least ``--batch-cells`` kept
  cells (the runs' default promise) and for the long run (the kept population), and
- the point estimate read off the calibration part (the largest coverage whose accuracy reaches the
  target there: what runs logged as ``threshold_at_<p>_accuracy`` before, on their test split),

each applied to the check part: the share of splits where the accuracy among the kept check cells reached
the target (the promise held), and the share of check cells each sends to review.

    python benchmarks/abstention_guarantee.py --store sqlite:////tmp/real/mlflow.db            # newest run
    python benchmarks/abstention_guarantee.py --store ... --runs <id> <id> --splits 2000 --confidence 0.95

"Held" is counted on the check part, a finite batch: the long-run promise is about the kept population,
which a batch scatters around (a binomial of the kept check cells), so it can hold and still miss on a
batch; the batch promise covers that scatter for batches of at least ``--batch-cells`` kept cells.
"""

from __future__ import annotations

import argparse

import numpy as np


def pooled_predictions(client, run_id: str, pool: str) -> tuple[np.ndarray, np.ndarray]:
    """The run's stored probabilities and labels of the splits in ``pool`` ("val+test" or "test")."""
    from bloodcell.evaluation.stored_predictions import required_predictions

    parts = [required_predictions(client, run_id, split, "train it again") for split in pool.split("+")]
    return (
        np.concatenate([p.probabilities for p in parts]),
        np.concatenate([p.labels for p in parts]),
    )


def split_outcomes(
    probabilities: np.ndarray,
    labels: np.ndarray,
    target: float,
    confidence: float,
    splits: int,
    calibration_share: float,
    batch_cells: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Per random split: from the calibration part, the guaranteed thresholds for batches of
    ``batch_cells`` kept cells ("b") and for the long run ("g"), and the point estimate ("p"); and what
    each kept on the check part (coverage, accuracy)."""
    from bloodcell.evaluation.abstention import (
        Guarantee,
        accuracy_coverage,
        check_threshold,
        coverage_at_accuracy,
        guaranteed_threshold,
    )

    size = int(round(calibration_share * len(labels)))
    rows: dict[str, list[float]] = {
        f"{prefix}_{k}": [] for prefix in "bgp" for k in ("threshold", "coverage", "accuracy")
    }
    for _ in range(splits):
        order = rng.permutation(len(labels))
        cal, check = order[:size], order[size:]
        batch = guaranteed_threshold(probabilities[cal], labels[cal], target, confidence, batch_cells)
        long_run = guaranteed_threshold(probabilities[cal], labels[cal], target, confidence)
        _, point = coverage_at_accuracy(accuracy_coverage(probabilities[cal], labels[cal]), target)
        for prefix, threshold in (("b", batch.threshold), ("g", long_run.threshold), ("p", point)):
            kept = check_threshold(
                probabilities[check], labels[check], Guarantee(target, confidence, threshold, size, 0.0)
            )
            rows[f"{prefix}_threshold"].append(threshold)
            rows[f"{prefix}_coverage"].append(kept.coverage)
            rows[f"{prefix}_accuracy"].append(kept.accuracy)
    return {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}


def report(name: str, outcome: dict[str, np.ndarray], target: float) -> str:
    """One table row: promises made, the share held, the review share (mean and 5-95% over splits)."""
    threshold, coverage, accuracy = (outcome[f"{name}_{k}"] for k in ("threshold", "coverage", "accuracy"))
    made = ~np.isnan(threshold)
    held = made & (accuracy >= target)  # NaN accuracy (nothing kept) is not >= target
    review = 1.0 - coverage[made]
    low, high = np.percentile(review, [5, 95]) if made.any() else (np.nan, np.nan)
    return (
        f"{made.sum():>5}/{len(made):<5} {held.sum() / max(made.sum(), 1):>8.1%} "
        f"{np.nanmedian(threshold) if made.any() else np.nan:>10.4f} "
        f"{review.mean() if made.any() else np.nan:>8.1%} ({low:.1%}-{high:.1%})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="MLflow tracking URI of the trained runs")
    ap.add_argument("--runs", nargs="*", help="run ids; default: the newest FINISHED run of --experiment")
    ap.add_argument("--experiment", default="mobilenet_cpu")
    ap.add_argument("--pool", choices=("val+test", "test"), default="val+test")
    ap.add_argument("--splits", type=int, default=1000)
    ap.add_argument("--calibration-share", type=float, default=0.5)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.98, 0.99])
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--batch-cells", type=int, default=None, help="default: trainer.abstention's default")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import mlflow

    client = mlflow.MlflowClient(args.store)
    run_ids = args.runs
    if not run_ids:
        experiment = client.get_experiment_by_name(args.experiment)
        if experiment is None:
            raise SystemExit(f"no experiment {args.experiment!r} in {args.store}: pass --runs")
        found = client.search_runs(
            [experiment.experiment_id],
            "attributes.status = 'FINISHED' AND tags.model_uri != ''",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        run_ids = [r.info.run_id for r in found]
    from bloodcell.evaluation.abstention import DEFAULT_BATCH_CELLS

    batch_cells = args.batch_cells or DEFAULT_BATCH_CELLS
    rng = np.random.default_rng(args.seed)
    for run_id in run_ids:
        probabilities, labels = pooled_predictions(client, run_id, args.pool)
        accuracy = float((probabilities.argmax(1) == labels).mean())
        size = int(round(args.calibration_share * len(labels)))
        print(
            f"\nrun {run_id}: {len(labels)} cells it never trained on ({args.pool}, "
            f"accuracy {accuracy:.4f}); "
            f"{args.splits} random splits into {size} calibration / {len(labels) - size} check cells; "
            f"confidence {args.confidence:g}"
        )
        print(
            f"{'target':>7} {'threshold':<14} {'promises':>11} {'held':>8} {'median t':>10} "
            f"{'to review (5-95%)':>26}"
        )
        for target in args.targets:
            outcome = split_outcomes(
                probabilities,
                labels,
                target,
                args.confidence,
                args.splits,
                args.calibration_share,
                batch_cells,
                rng,
            )
            print(f"{target:>7.3f} {f'batch>={batch_cells}':<14} {report('b', outcome, target)}")
            print(f"{'':>7} {'long run':<14} {report('g', outcome, target)}")
            print(f"{'':>7} {'point':<14} {report('p', outcome, target)}")


if __name__ == "__main__":
    main()
