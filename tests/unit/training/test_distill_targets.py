"""Distillation without training: its targets (bloodcell.distill.soft_targets), the one hook through which
training takes them (`Arrays.targets`, which the training pipeline hands the model in place of the one-hot
labels), its config checks and the refusal of a teacher of other data or another split."""

from __future__ import annotations

import re

import numpy as np
import pytest
from omegaconf import OmegaConf

from bloodcell import NUM_CLASSES
from bloodcell.core.cli import compose
from bloodcell.core.errors import UserError
from bloodcell.data import load_arrays, make_tf_dataset
from bloodcell.distill import check_config
from bloodcell.training.distillation import soft_targets

LABELS = np.array([0, 3, 7, 5])
#: a confident teacher, right on the first three images and wrong on the last
TEACHER = np.full((4, NUM_CLASSES), 0.02)
TEACHER[[0, 1, 2, 3], [0, 3, 7, 2]] = 1 - 0.02 * (NUM_CLASSES - 1)


def test_alpha_one_gives_the_one_hot_truth_and_zero_the_teachers_probabilities():
    np.testing.assert_allclose(soft_targets(LABELS, TEACHER, 1.0, 2.0), np.eye(NUM_CLASSES)[LABELS])
    np.testing.assert_allclose(soft_targets(LABELS, TEACHER, 0.0, 1.0), TEACHER, atol=1e-6)


@pytest.mark.parametrize("alpha, temperature", [(0.5, 1.0), (0.3, 4.0), (0.9, 0.5)])
def test_rows_are_distributions_that_mix_the_truth_in_by_alpha(alpha, temperature):
    targets = soft_targets(LABELS, TEACHER, alpha, temperature)
    assert targets.dtype == np.float32 and targets.shape == (4, NUM_CLASSES)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
    assert (targets >= 0).all()
    # the true class gets alpha at least, whatever the teacher says
    assert (targets[np.arange(4), LABELS] >= alpha - 1e-6).all()


def test_temperature_flattens_the_teachers_probabilities():
    top = [soft_targets(LABELS, TEACHER, 0.0, t).max(axis=1) for t in (1.0, 2.0, 4.0)]
    assert (top[0] > top[1]).all() and (top[1] > top[2]).all() and (top[2] > 1 / NUM_CLASSES).all()
    # ... without changing which class it prefers
    for t in (0.5, 2.0, 4.0):
        assert (soft_targets(LABELS, TEACHER, 0.0, t).argmax(axis=1) == TEACHER.argmax(axis=1)).all()


def test_the_training_pipeline_hands_the_model_each_images_own_targets():
    arrays = load_arrays(OmegaConf.create({"format": "demo", "per_class": 2, "image_size": 8, "limit": None}))
    rng = np.random.default_rng(0)
    arrays.targets = rng.dirichlet(np.ones(NUM_CLASSES), size=len(arrays)).astype(np.float32)
    by_image = {image.tobytes(): target for image, target in zip(arrays.images, arrays.targets)}
    import tensorflow as tf

    epoch = tf.Variable(1, dtype=tf.int64)
    for kwargs in ({}, {"epoch": epoch}):  # the seeded shuffle, and the per-epoch order
        seen = 0
        for x, y in make_tf_dataset(arrays, 5, training=True, seed=3, **kwargs):
            for image, target in zip(x.numpy().astype(np.uint8), y.numpy()):
                np.testing.assert_allclose(target, by_image[image.tobytes()])
                seen += 1
        assert seen == len(arrays)
    # validation and test batches, and any split without targets, keep the one-hot labels
    arrays.targets = None
    _, y = next(iter(make_tf_dataset(arrays, 16, training=False, seed=3)))
    np.testing.assert_array_equal(y.numpy(), np.eye(NUM_CLASSES)[arrays.labels[:16]])
    subset = arrays.subset(np.arange(4))
    assert subset.targets is None


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ([], "say which model teaches: teacher="),
        (["teacher=abc", "distill.alpha=1.5"], "distill.alpha=1.5 must be <= 1"),
        (["teacher=abc", "distill.temperature=0"], "distill.temperature=0 must be > 0"),
        (["teacher=abc", "data.cv.folds=3"], "distill trains one student, not 3 folds"),
    ],
)
def test_a_bad_distill_config_is_one_line_before_anything_starts(overrides, fragment):
    with pytest.raises(UserError, match=fragment):
        check_config(compose(["+experiment=quickstart", *overrides], "distill"))


def test_a_distill_config_is_a_training_config_with_a_teacher():
    cfg = compose(["+experiment=quickstart", "teacher=abc"], "distill")
    check_config(cfg)
    assert cfg.distill.alpha == 0.5 and cfg.distill.temperature == 2.0
    assert cfg.backbone.name == "small_cnn" and cfg.tracking.experiment == "quickstart"


def teacher_of(splits, **tags):
    """A Teacher whose run carries ``tags`` over the fingerprints of ``splits`` (no MLflow store)."""
    from types import SimpleNamespace

    from bloodcell.evaluation.candidates import Candidate
    from bloodcell.training.distillation import Teacher

    tags = {"data_fingerprint": splits.train.fingerprint, "split_fingerprint": splits.fingerprint(), **tags}
    run = SimpleNamespace(
        info=SimpleNamespace(run_id="f" * 32),
        data=SimpleNamespace(tags=tags, params={"seed": "42"}, metrics={}),
    )
    return Teacher("teacher-run", Candidate("teacher-run", run, "bloodcell"), "runs:/x/model")


@pytest.fixture
def splits():
    from bloodcell.data import split_arrays

    arrays = load_arrays(OmegaConf.create({"format": "demo", "per_class": 6, "image_size": 8, "limit": None}))
    return split_arrays(arrays, 0.2, 0.2, seed=42)


def test_only_a_teacher_of_the_students_data_and_split_teaches_unless_told(splits, caplog):
    assert teacher_of(splits).check_split(splits, allow_different=False)
    for tags, fragment in [
        ({"data_fingerprint": "0" * 64}, "other data than the student"),
        ({"split_fingerprint": "0" * 64}, "split differently (its split seed 42"),
    ]:
        teacher = teacher_of(splits, **tags)
        with pytest.raises(UserError, match=re.escape(fragment)) as refused:
            teacher.check_split(splits, allow_different=False)
        assert "\n" not in str(refused.value) and "distill.allow_different=true" in str(refused.value)
        assert teacher.check_split(splits, allow_different=True) is False
        assert fragment.split(" (")[0] in caplog.text
