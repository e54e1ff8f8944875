"""Repeated and cross-validated trials (issue 15 item 4), the parts that need no training: the folds, the
members' configs, the config checks and the Wilcoxon pruner as the sweeper's config builds it."""

from __future__ import annotations

import warnings

import numpy as np
import optuna
import pytest

from bloodcell.core.cli import compose
from bloodcell.core.errors import UserError
from bloodcell.data import cv_fold, make_demo_set, split_arrays
from bloodcell.data import fingerprint as data_fingerprint
from bloodcell.sweep.tables import make_pruner
from bloodcell.training.recipe import check_config as check_train_config
from bloodcell.training.repeats import member_config, plan
from hydra_plugins.bloodcell_optuna_sweeper import config
from tests.helpers import TINY


def demo_arrays(per_class: int = 13):
    from bloodcell.data import Arrays

    images, labels = make_demo_set(per_class, 16, seed=5)
    # uneven classes: the last class keeps 7 images, so stratification has something to do
    keep = np.concatenate([np.flatnonzero(labels != 7), np.flatnonzero(labels == 7)[:7]])
    images, labels = images[keep], labels[keep]
    return Arrays(images, labels, data_fingerprint(images, labels), "demo")


def test_folds_are_stratified_disjoint_cover_the_pool_and_leave_the_test_split_alone():
    arrays = demo_arrays()
    splits = split_arrays(arrays, 0.15, 0.15, seed=3)
    pool = np.sort(np.concatenate([splits.positions("train"), splits.positions("val")]))
    folds = [cv_fold(arrays, splits, 3, k, seed=3) for k in range(3)]
    vals = [f.positions("val") for f in folds]
    for fold, val in zip(folds, vals):
        # the held-out test split is the ordinary one, untouched, in no fold
        np.testing.assert_array_equal(fold.positions("test"), splits.positions("test"))
        np.testing.assert_array_equal(fold.test.labels, splits.test.labels)
        assert not set(val) & set(splits.positions("test"))
        # training = the pool less this fold
        assert sorted(fold.positions("train")) == sorted(set(pool) - set(val))
        np.testing.assert_array_equal(fold.val.labels, arrays.labels[val])
    # disjoint validation folds that together are the whole pool
    assert sum(len(v) for v in vals) == len(pool)
    assert sorted(np.concatenate(vals)) == list(pool)
    # stratified: per class, fold sizes differ by at most one image
    counts = np.array([np.bincount(arrays.labels[v], minlength=8) for v in vals])
    assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all(), counts
    # the same seed cuts the same folds; another seed others
    np.testing.assert_array_equal(cv_fold(arrays, splits, 3, 1, seed=3).positions("val"), vals[1])
    assert not np.array_equal(cv_fold(arrays, splits, 3, 1, seed=4).positions("val"), vals[1])


def test_a_fold_outside_the_folds_is_a_user_error():
    arrays = demo_arrays()
    splits = split_arrays(arrays, 0.15, 0.15, seed=3)
    with pytest.raises(UserError, match="data.cv.fold=3 is not one of 0..2"):
        cv_fold(arrays, splits, 3, 3, seed=3)
    with pytest.raises(UserError, match="data.cv.fold"):
        check_train_config(compose([*TINY, "data.cv.fold=1"]))  # a fold without folds
    with pytest.raises(UserError, match="data.cv.fold=3 needs data.cv.folds above it"):
        check_train_config(compose([*TINY, "data.cv.folds=3", "data.cv.fold=3"]))
    check_train_config(compose([*TINY, "data.cv.folds=3", "data.split_seed=7"]))


def sweep_trial_config(*overrides: str):
    cfg = compose([*TINY, *overrides])
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.trial = {"storage": "journal:x", "study_name": "s", "trial_id": 4, "number": 3, "repeats": 3}
        cfg.tracking.parent_run_id = "sweep-parent"
        cfg.tracking.run_name = "s-trial-3"
    return cfg


def test_repeats_vary_the_seed_on_one_split_and_report_nothing_themselves():
    cfg = sweep_trial_config("seed=10")
    assert plan(cfg) == ("repeat", 3)
    members = [member_config(cfg, "repeat", i, "group-run", None) for i in range(3)]
    assert [m.seed for m in members] == [10, 11, 12]
    assert {m.data.split_seed for m in members} == {42}  # the fixed default split for all three
    for i, member in enumerate(members):
        assert "trial" not in member  # no epoch reports to Optuna, no trial tags: the group run has them
        assert member.tracking.parent_run_id == "group-run"
        assert member.tracking.run_name == f"s-trial-3-repeat-{i}"
        assert dict(member.tracking.tags) == {
            "bloodcell.member": "repeat",
            "bloodcell.member_index": str(i),
            "bloodcell.member_count": "3",
        }
        check_train_config(member)
    assert cfg.seed == 10 and "trial" in cfg and cfg.tracking.parent_run_id == "sweep-parent"  # untouched
    own_split = sweep_trial_config("seed=10", "data.split_seed=null")  # split by the seed, as before
    assert {member_config(own_split, "repeat", i, "g", None).data.split_seed for i in range(3)} == {10}
    resumed = member_config(cfg, "repeat", 1, "group-run", "run-abc")
    assert resumed.trainer.resume == "run-abc"


def test_folds_keep_the_seed_and_set_the_fold():
    cfg = compose([*TINY, "data.cv.folds=3", "seed=5"])
    assert plan(cfg) == ("fold", 3)
    member = member_config(cfg, "fold", 2, "group-run", None)
    assert (member.seed, member.data.cv.fold, member.data.cv.folds) == (5, 2, 3)
    assert plan(member) == ("", 1)  # a member is one ordinary run
    assert plan(compose([*TINY, "data.cv.folds=1"])) == ("", 1)
    assert plan(compose(TINY)) == ("", 1)
    with pytest.raises(UserError, match="choose one"):
        plan(sweep_trial_config("data.cv.folds=3"))


def test_wilcoxon_pruner_from_the_sweeper_config_stops_a_hopeless_cross_validated_trial():
    options = config.options_from(
        {"pruner": {"name": "wilcoxon", "wilcoxon": {"p_threshold": 0.05, "n_startup_steps": 3}}}
    )
    assert options.repeats == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        pruner = make_pruner({"name": options.pruner.name, "kwargs": dict(options.pruner.wilcoxon)})
        assert isinstance(pruner, optuna.pruners.WilcoxonPruner)
        study = optuna.create_study(direction="maximize", pruner=pruner)
        folds = 10
        good = study.ask()
        for fold in range(folds):
            good.report(0.90 + 0.005 * fold, fold)
        study.tell(good, 0.9225)
        bad = study.ask()
        pruned_at = None
        for fold in range(folds):
            bad.report(0.50 + 0.005 * fold, fold)  # worse on every fold
            if bad.should_prune():
                pruned_at = fold
                break
    # not before n_startup_steps folds, and well before the last: the point of the pruner
    assert pruned_at is not None and 3 <= pruned_at < folds - 1
