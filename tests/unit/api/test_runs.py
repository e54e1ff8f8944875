"""bloodcell.api's functions that read trained runs (runs, compare, ensemble, promote, predict, explain), on
the session's shared tiny runs (tests/tiny_runs.py): each called twice, and again after an error, in one
process; bad input is one UserError with the line the command prints. Functions that write (compare's run,
ensemble, promote) work on a copy of the store."""

from __future__ import annotations

import numpy as np
import pytest

from bloodcell import api
from tests.helpers import assert_user_error, run_module
from tests.unit.api.test_training import assert_clean


@pytest.fixture(scope="module")
def store(tiny_runs) -> str:
    """The shared store, read only."""
    return f"tracking.uri=sqlite:///{tiny_runs.db}"


@pytest.fixture(scope="module")
def cells() -> tuple[np.ndarray, np.ndarray]:
    """16 demo cells of the tiny runs' size (32x32) and their labels."""
    from bloodcell.data import make_demo_set

    return make_demo_set(per_class=2, image_size=32, seed=5)


def test_runs_is_the_experiments_table(tiny_runs, store):
    with pytest.raises(api.UserError, match=r"^experiment 'nope' not found in .*\(experiments: .*members"):
        api.runs("nope", store)
    assert_clean()
    table = api.runs("quickstart", store)
    assert table["run_id"].tolist() == [tiny_runs.quickstart]
    assert {"metrics.test_accuracy", "params.trainer.epochs", "tags.model_uri"} <= set(table.columns)
    children = api.runs("members", store, filter_string=f"tags.mlflow.parentRunId = '{tiny_runs.sweep}'")
    assert sorted(children["run_id"]) == sorted([tiny_runs.a, tiny_runs.b])
    assert_clean()


def test_compare_twice_and_after_an_error(tiny_runs, store):
    with pytest.raises(api.UserError, match=r"^compare needs two models at least"):
        api.compare([tiny_runs.a], store)
    assert_clean()
    for _ in range(2):
        result = api.compare([tiny_runs.a, f"runs:/{tiny_runs.b}/model"], store, "log=false")
        assert_clean()
        assert [m.run_id for m in result.comparison.models] == [tiny_runs.a, tiny_runs.b]
        assert result.run_id is None and "McNemar" in result.text()
        assert "<pre>" in result._repr_html_()


def test_compare_logs_its_run_with_a_link(tiny_runs, tmp_path):
    uri = tiny_runs.copy(tmp_path)
    result = api.compare([tiny_runs.a, tiny_runs.b], f"tracking.uri={uri}", "contact_sheet=false")
    assert result.run_id and result.link and result.link in result._repr_html_()


def test_ensemble_twice_and_after_an_error(tiny_runs, tmp_path):
    store = f"tracking.uri={tiny_runs.copy(tmp_path)}"
    with pytest.raises(api.UserError, match=r"^selection='best' is unknown; use topk or greedy"):
        api.ensemble([tiny_runs.a, tiny_runs.b], store, "selection=best")
    assert_clean()
    made = [
        api.ensemble([tiny_runs.a, tiny_runs.b], store, "calibrate=false", *unlogged)
        for unlogged in ([], ["tracking.log_model=false"])  # the second without a model: cheaper
    ]
    assert_clean()
    assert made[0].run_id != made[1].run_id and made[0].status == made[1].status == "FINISHED"
    assert made[0].model_uri and made[1].model_uri is None
    assert made[0].config is not None and list(made[0].config.ensemble.runs) == [tiny_runs.a, tiny_runs.b]
    assert made[0].metrics["ensemble_members"] == 2


def test_promote_twice_and_after_an_error(tiny_runs, tmp_path):
    store = f"tracking.uri={tiny_runs.copy(tmp_path)}"
    with pytest.raises(api.UserError, match=r"experiment 'nope'"):
        api.promote("experiment=nope", store)
    assert_clean()
    first = api.promote("experiment=quickstart", store)
    second = api.promote("experiment=quickstart", store)
    assert_clean()
    assert first.promotion.run_id == tiny_runs.quickstart and first.promotion.created
    assert first.promotion.alias_moved and first.model_uri == "models:/bloodcell-demo@champion"
    assert second.promotion.version == first.promotion.version and not second.promotion.created
    assert "bloodcell-demo version 1" in first._repr_html_()


def test_a_bad_value_is_the_line_the_command_prints(tiny_runs, store):
    proc = run_module("bloodcell.promote", "experiment=quickstart", "gate.alpha=2", store)
    line = assert_user_error(proc)
    with pytest.raises(api.UserError) as raised:
        api.promote("experiment=quickstart", "gate.alpha=2", store)
    assert f"error: {raised.value}" == line


def test_predict_twice_and_after_an_error(tiny_runs, store, cells, tmp_path):
    images, labels = cells
    model = f"runs:/{tiny_runs.quickstart}/model"
    with pytest.raises(api.UserError, match=r"^run 'nope' not found in this tracking store"):
        api.predict("runs:/nope/model", images, store)
    with pytest.raises(api.UserError, match=r"images must be an array \(N, height, width, 3\)"):
        api.predict(model, images[0, 0], store)
    assert_clean()
    first = api.predict(model, images, store)
    second = api.predict(model, images, store, "batch_size=5")
    assert_clean()
    assert first.shape == (16, 8) and first.dtype == np.float32
    np.testing.assert_allclose(first.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(first, second, atol=1e-5)
    np.savez(tmp_path / "cells.npz", images=images, labels=labels)  # a path, as the command's input=
    np.testing.assert_allclose(api.predict(model, str(tmp_path / "cells.npz"), store), first, atol=1e-5)


def test_explain_twice_and_after_an_error(tiny_runs, store, cells):
    images, labels = cells
    model = f"runs:/{tiny_runs.quickstart}/model"
    with pytest.raises(api.UserError, match=r"labels outside 0-7"):
        api.explain(model, images, store, labels=labels + 8)
    assert_clean()
    labelled = api.explain(model, images, store, labels=labels)
    unlabelled = api.explain(model, images, store, "limit=4")
    assert_clean()
    assert labelled.errors is not None and labelled.probabilities.shape == (16, 8)
    assert unlabelled.errors is None and unlabelled.probabilities is None
    assert labelled.gradcam.png.startswith(b"\x89PNG") and labelled._repr_html_().count("<img") == 2
