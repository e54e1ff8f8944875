"""Issue 15: intervals, paired tests, the champion gate's rule and the sweep's ties, on constructed
predictions (no training, no subprocess)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import binomtest

from bloodcell import CLASS_NAMES, NUM_CLASSES
from bloodcell.evaluation import stats


def _balanced(per_class: int) -> np.ndarray:
    return np.repeat(np.arange(NUM_CLASSES), per_class)


def _wrong(labels: np.ndarray) -> np.ndarray:
    return (labels + 1) % NUM_CLASSES


def _one_hot(predicted: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype=np.float32)[predicted]


def test_wilson_interval_of_90_of_100_is_scipys():
    ci = binomtest(90, 100).proportion_ci(confidence_level=0.95, method="wilson")
    assert stats.wilson(90, 100) == pytest.approx((ci.low, ci.high))
    assert stats.wilson(90, 100) == pytest.approx((0.8256, 0.9448), abs=1e-4)  # the textbook figures
    assert all(math.isnan(x) for x in stats.wilson(0, 0))


def test_a_run_evaluation_carries_intervals_under_the_helper_names():
    from bloodcell.evaluation.metrics import evaluate_predictions

    labels = np.arange(100) % NUM_CLASSES
    predicted = labels.copy()
    predicted[:10] = _wrong(labels[:10])  # 90 of 100 right
    evaluation = evaluate_predictions(labels, _one_hot(predicted), "test_")
    low, high = stats.interval_names("test_accuracy")
    assert (low, high) == ("test_accuracy_ci_low", "test_accuracy_ci_high")
    assert evaluation.metrics["test_accuracy"] == pytest.approx(0.9)
    assert (evaluation.metrics[low], evaluation.metrics[high]) == pytest.approx(stats.wilson(90, 100))
    f1_low, f1_high = (evaluation.metrics[k] for k in stats.interval_names("test_macro_f1"))
    assert f1_low < evaluation.metrics["test_macro_f1"] < f1_high
    # per-class recall intervals in the classification report: Wilson of that class's images
    for c, name in enumerate(CLASS_NAMES):
        mine = labels == c
        right = int(np.sum(predicted[mine] == c))
        report = evaluation.report[name]
        assert (report["recall_ci_low"], report["recall_ci_high"]) == pytest.approx(
            stats.wilson(right, int(mine.sum()))
        )


def test_macro_f1_interval_brackets_sklearn_and_a_perfect_model_is_a_point():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, NUM_CLASSES, 2000)
    predicted = np.where(rng.random(2000) < 0.85, labels, rng.integers(0, NUM_CLASSES, 2000))
    low, high = stats.macro_f1_interval(labels, predicted)
    point = f1_score(labels, predicted, average="macro")
    assert low < point < high and high - low < 0.05
    assert stats.macro_f1_interval(labels, labels) == (1.0, 1.0)
    assert stats.macro_f1_interval(labels, predicted) == (low, high)  # seeded: the same every time


def test_mcnemar_exact_p_of_a_constructed_difference():
    labels = _balanced(25)  # 200 images
    right_a = np.ones(200, bool)
    right_b = np.ones(200, bool)
    right_a[:12] = False  # only B right on 12 images
    right_b[12:14] = False  # only A right on 2
    test = stats.mcnemar(right_a, right_b)
    assert test.table.tolist() == [[186, 2], [12, 0]]
    assert test.p_value == pytest.approx(binomtest(2, 14, 0.5).pvalue)
    assert test.p_value == pytest.approx(0.012939, abs=1e-6)
    assert stats.mcnemar(right_a, right_a).p_value == 1.0
    del labels


def test_recall_deltas_resample_each_class_and_holm_adjusts():
    labels = _balanced(20)
    a = labels.copy()
    b = labels.copy()
    b[:4] = _wrong(labels[:4])  # B loses 4 of the 20 basophils
    deltas = stats.recall_deltas(labels, a, b)
    assert deltas[0].delta == pytest.approx(-0.2) and deltas[0].images == 20
    assert deltas[0].interval[0] < -0.2 < deltas[0].interval[1] <= 0
    assert all(d.delta == 0 for d in deltas[1:])
    assert stats.holm([0.01, 0.04, 0.2]) == pytest.approx([0.03, 0.08, 0.2])


def _pair(holder_wrong: int, challenger_wrong_basophils: int):
    from bloodcell.evaluation.comparison import compare_pair

    labels = _balanced(50)  # 400 images, 50 per class
    holder = labels.copy()
    holder[50 : 50 + holder_wrong] = _wrong(labels[50 : 50 + holder_wrong])  # misses eosinophils and on
    challenger = labels.copy()
    challenger[:challenger_wrong_basophils] = _wrong(labels[:challenger_wrong_basophils])
    return compare_pair(labels, holder, challenger, "holder", "challenger")


def test_gate_refuses_a_challenger_better_overall_but_worse_on_one_class():
    from bloodcell.serving.gates import _judge

    pair = _pair(holder_wrong=30, challenger_wrong_basophils=2)  # 30 vs 2 errors; basophils 100 -> 96
    assert pair.test.p_value < 1e-5
    decision = _judge(pair, "test", "holder version 1", alpha=0.05, max_class_drop=0.02, tags={})
    assert not decision.moved
    assert "basophil -4.0" in decision.reason and "better overall" in decision.reason
    assert decision.tags["gate.class_recall_deltas"].startswith('{"basophil": -0.04')
    # a rare class counts as much as a common one: the same 2 images, but allowed 5 points
    assert _judge(pair, "test", "h", alpha=0.05, max_class_drop=0.05, tags={}).moved


def test_gate_accepts_a_clearly_better_challenger_and_refuses_noise():
    from bloodcell.serving.gates import _judge

    decision = _judge(_pair(30, 0), "test", "holder version 1", 0.05, 0.02, {})
    assert decision.moved and "better than holder version 1" in decision.reason
    assert "challenger right" in decision.details and "McNemar exact p" in decision.details
    noise = _judge(_pair(3, 1), "test", "holder version 1", 0.05, 0.02, {})  # 3 vs 1: p = 0.625
    assert not noise.moved and "not better" in noise.reason


# ---- the sweep's ties ----------------------------------------------------------------------------------


def _trial(number: int, value: float):
    from optuna.trial import TrialState

    return SimpleNamespace(number=number, value=value, state=TrialState.COMPLETE)


def _child(number: int, split: str = "s1"):
    metrics = {
        "final_val_accuracy": 0.9,
        "final_val_accuracy_ci_low": 0.85,
        "final_val_accuracy_ci_high": 0.93,
    }
    return SimpleNamespace(
        info=SimpleNamespace(run_id=f"run{number}", status="FINISHED", start_time=number),
        data=SimpleNamespace(tags={"trial_number": str(number), "split_fingerprint": split}, metrics=metrics),
    )


def test_sweep_report_names_the_trials_tied_with_the_best(monkeypatch, tmp_path):
    import bloodcell.evaluation.stored_predictions as stored_module
    from hydra_plugins.bloodcell_optuna_sweeper import _report

    labels = _balanced(50)
    errors = {0: 20, 1: 22, 2: 24, 3: 80, 4: 21}  # trial 0 best; 3 clearly worse; 4 on other images
    stored = {}
    for number, wrong in errors.items():
        predicted = labels.copy()
        predicted[:wrong] = _wrong(labels[:wrong])
        stored[f"run{number}"] = stored_module.Predictions(
            labels, _one_hot(predicted), np.arange(400), np.arange(400)
        )
    monkeypatch.setattr(stored_module, "stored_predictions", lambda client, run_id, split: stored[run_id])
    trials = [_trial(n, 1 - e / 400) for n, e in errors.items()]
    children = [_child(n, "s2" if n == 4 else "s1") for n in errors]
    noise = _report.sweep_noise(None, children, trials, trials[0])
    assert noise.tied == [0, 1, 2]
    assert noise.columns[3]["tied_with_best"] == "no" and noise.columns[4]["tied_with_best"] == "n/a"
    assert noise.summary.startswith("3 trials are a tie: trials 0, 1, 2")  # trial 4 ranks above 2
    assert noise.columns[1]["final_val_accuracy_ci_low"] == 0.85

    import optuna

    study = optuna.create_study(direction="maximize")
    for t in trials:
        study.add_trial(optuna.trial.create_trial(value=t.value, params={}, distributions={}))
    path = _report._trials_table(study, tmp_path / "trials.csv", noise)
    header = path.read_text().splitlines()[0].split(",")
    assert {"final_val_accuracy_ci_low", "p_vs_best_holm", "tied_with_best"} <= set(header)
