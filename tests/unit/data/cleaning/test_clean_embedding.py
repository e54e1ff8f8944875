"""The embedding score of bloodcell.clean (issue 17): flagged with its reason, off without weights, cached.

Small images and a few dozen samples: the smear-like cells of tests/test_clean.py, 48 x 48.
"""

from __future__ import annotations

import numpy as np
import pytest

from bloodcell.core.errors import UserError
from bloodcell.data.cleaning import embedding as emb
from bloodcell.data.cleaning import find_unwanted, find_unwanted_cached
from tests.helpers import SHARED_WEIGHTS, needs_shared_weights, sqlite_store
from tests.smears import foreign_picture, smear_set

# the hand-made outlier check off, so that only the embedding can flag a foreign image
EMBEDDING_ONLY = {"outliers": {"enabled": False}}


def photos(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Crops of the photographs that ship with scikit-learn (a temple, a flower), resized to size x size."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pic = load_sample_images().images[i % 2]
        s = int(rng.integers(120, 300))
        y, x = rng.integers(0, pic.shape[0] - s), rng.integers(0, pic.shape[1] - s)
        crop = Image.fromarray(pic[y : y + s, x : x + s]).resize((size, size), Image.Resampling.BILINEAR)
        out.append(np.asarray(crop))
    return np.stack(out)


@pytest.fixture(scope="module")
def cells_and_photos():
    images, labels = smear_set(n_per_class=8, seed=3)
    extra = photos(4, images.shape[1])
    x = np.concatenate([images, extra])
    y = np.concatenate([labels, np.arange(4) % 8])
    return x, y, set(range(len(labels), len(y)))


@needs_shared_weights
def test_photos_among_cells_are_embedding_outliers(cells_and_photos):
    x, y, foreign = cells_and_photos
    result = find_unwanted(x, y, EMBEDDING_ONLY)
    reasons = {e["index"]: e for e in result.removed}
    assert foreign <= set(reasons), sorted(set(reasons))
    for i in foreign:
        assert reasons[i]["reason"] == "embedding_outlier" and reasons[i]["where"]
        assert reasons[i]["score"] > 0
    real_removed = set(reasons) - foreign
    assert len(real_removed) <= 1, real_removed
    assert result.counts["embedding_outlier"] == len(foreign) + len(real_removed)
    assert not any("embedding score off" in note for note in result.notes)


def test_a_trained_model_can_be_the_network(cells_and_photos, tmp_path):
    """cleaning.embedding.model: a bloodcell model (resizing, preprocessing, a nested "backbone") saved as
    .keras; its backbone's layers give the statistics. Runs without ../shared."""
    import keras

    from bloodcell.models.backbones import small_cnn

    x, y, foreign = cells_and_photos
    keras.utils.set_random_seed(0)
    inputs = keras.Input(x.shape[1:])
    backbone = small_cnn(x.shape[1:], filters=(8, 16))
    backbone.name = "backbone"
    h = backbone(keras.layers.Rescaling(1 / 255.0)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(8, activation="softmax")(h))
    path = tmp_path / "model.keras"
    model.save(path)
    cfg = {
        **EMBEDDING_ONLY,
        "embedding": {"model": str(path), "layer": "conv_block1_relu2", "tile_layer": "conv_block1_relu1"},
    }
    result = find_unwanted(x, y, cfg)
    assert result.scores["embedding_z"].shape == (len(y),)
    z = np.maximum.reduce([result.scores[k] for k in result.scores if k.startswith("embedding")])
    real = np.array([i not in foreign for i in range(len(y))])
    # even random filters see that a photograph is no smear: every photo odder than the typical cell
    assert z[~real].min() > np.median(z[real])

    with pytest.raises(UserError, match="not a layer"):
        find_unwanted(x, y, {"embedding": {"model": str(path), "layer": "conv_pw_3_relu"}})


def test_a_registered_model_is_read_from_its_store_and_mlflow_s_current_store_stays(
    cells_and_photos, tmp_path, monkeypatch
):
    """cleaning.embedding.model=models:/<name>@<alias> is looked up in cleaning.embedding.tracking_uri
    without pointing MLflow elsewhere, even for a moment (training cleans inside its run, on its store)."""
    import keras
    import mlflow

    from bloodcell.models.backbones import small_cnn

    x, y, _ = cells_and_photos
    keras.utils.set_random_seed(0)
    inputs = keras.Input(x.shape[1:])
    backbone = small_cnn(x.shape[1:], filters=(8, 16))
    backbone.name = "backbone"
    model = keras.Model(inputs, keras.layers.Dense(8)(backbone(keras.layers.Rescaling(1 / 255.0)(inputs))))
    model.save(tmp_path / "model.keras")
    store, training = sqlite_store(tmp_path / "models.db"), sqlite_store(tmp_path / "training.db")
    client = mlflow.MlflowClient(store)
    experiment = client.create_experiment("models", artifact_location=(tmp_path / "artifacts").as_uri())
    previous, set_tracking_uri = mlflow.get_tracking_uri(), mlflow.set_tracking_uri
    try:
        mlflow.set_tracking_uri(store)  # the fluent API logs to the current store
        with mlflow.start_run(experiment_id=experiment) as run:
            logged = mlflow.keras.log_model(model, name="model")
        client.create_registered_model("cells")
        version = client.create_model_version(
            "cells", source=logged.model_uri, run_id=run.info.run_id, model_id=logged.model_id
        )
        client.set_registered_model_alias("cells", "champion", version.version)
        mlflow.set_tracking_uri(training)
        monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: pytest.fail(f"MLflow pointed at {uri}"))
        layers = {"layer": "conv_block1_relu2", "tile_layer": "conv_block1_relu1"}
        for spec in ("models:/cells@champion", f"runs:/{run.info.run_id}/model"):
            cfg = {**EMBEDDING_ONLY, "embedding": {"model": spec, "tracking_uri": store, **layers}}
            from_store = find_unwanted(x, y, cfg)
            assert mlflow.get_tracking_uri() == training
            from_file = find_unwanted(
                x, y, {**EMBEDDING_ONLY, "embedding": {"model": str(tmp_path / "model.keras"), **layers}}
            )
            for key, z in from_file.scores.items():
                np.testing.assert_allclose(from_store.scores[key], z, rtol=1e-5, atol=1e-6)
    finally:
        set_tracking_uri(previous)


def test_without_weights_the_hand_made_checks_run_and_a_note_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(emb, "SHARED_WEIGHTS", tmp_path / "absent.h5")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty Keras cache
    images, labels = smear_set(n_per_class=5, seed=4)
    picture = foreign_picture(np.random.default_rng(5))
    x, y = np.concatenate([images, picture[None]]), np.append(labels, 2)
    result = find_unwanted(x, y)
    assert {e["index"]: e["reason"] for e in result.removed} == {len(labels): "outlier"}
    off = [note for note in result.notes if note.startswith("embedding score off")]
    assert len(off) == 1 and "weights=imagenet" in off[0] and "\n" not in off[0]
    assert not result.scores["embedding_z"].any()
    # weights=null says it too
    result = find_unwanted(x, y, {"embedding": {"backbone": {"weights": None}}})
    assert any(note.startswith("embedding score off") for note in result.notes)


def test_auto_weights_find_the_shared_file_or_the_keras_cache(monkeypatch, tmp_path):
    backbone = {"name": "mobilenet", "weights": "auto", "kwargs": {"alpha": 0.25}}
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(emb, "SHARED_WEIGHTS", tmp_path / "absent.h5")
    assert emb.resolve_weights(backbone)[0] is None
    cached = tmp_path / "models" / "mobilenet_2_5_224_tf_no_top.h5"
    cached.parent.mkdir()
    cached.write_bytes(b"")
    assert emb.resolve_weights(backbone) == (str(cached), None)
    shared = tmp_path / "shared.h5"
    shared.write_bytes(b"")
    monkeypatch.setattr(emb, "SHARED_WEIGHTS", shared)
    assert emb.resolve_weights(backbone) == (str(shared), None)
    # another alpha has no shared file; an explicit choice is taken as given
    assert emb.resolve_weights({**backbone, "kwargs": {"alpha": 0.5}})[0] is None
    assert emb.resolve_weights({**backbone, "weights": "imagenet"}) == ("imagenet", None)


def test_cache_hits_skip_the_embedding(monkeypatch, tmp_path):
    """A cleaning-cache hit runs no network; other thresholds re-score from the cached features."""
    calls = []

    def fake_embed(images, emb_cfg):  # statistics of 4 channels, no TensorFlow
        calls.append(len(images))
        rng = np.random.default_rng(0)
        n = len(images)
        return {"image": rng.normal(size=(n, 4 + 10)), "tiles": rng.random((n, 4, 4, 8))}, "fake network"

    monkeypatch.setattr(emb, "embed", fake_embed)
    monkeypatch.setattr(emb, "resolve_weights", lambda backbone: ("fake.h5", None))
    images, labels = smear_set(n_per_class=5, seed=6)
    first, hit1 = find_unwanted_cached(images, labels, None, "f00d", tmp_path)
    second, hit2 = find_unwanted_cached(images, labels, None, "f00d", tmp_path)
    third, hit3 = find_unwanted_cached(images, labels, {"embedding": {"max_z": 3.0}}, "f00d", tmp_path)
    assert (hit1, hit2, hit3) == (False, True, False)
    assert calls == [len(labels)], "the network ran once: the third call re-scored cached features"
    assert (first.keep == second.keep).all()
    assert len(list(tmp_path.glob("embedding-*.npz"))) == 1
    # other network settings: features computed again
    find_unwanted_cached(images, labels, {"embedding": {"tiles": 2}}, "f00d", tmp_path)
    assert len(calls) == 2


@pytest.mark.parametrize("detector", ["lof", "knn", "isolation_forest"])
def test_detectors_rank_an_obvious_outlier_first(detector):
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(size=(60, 5)), np.full((1, 5), 8.0)])
    assert emb.detector_scores(x, detector, 5).argmax() == 60


def test_tile_summary_tells_a_patch_from_a_blend():
    z = np.zeros((3, 16))
    z[1, :] = 5.0  # every tile a little odd: a picture blended over the whole frame
    z[2, 5] = 30.0  # one tile very odd: a patch
    spread, local, worst = emb.tile_summary(z, local_tiles=4)
    assert spread.argmax() == 1 and local.argmax() == 2 and worst[2] == 5
    assert local[2] == pytest.approx(7.5)


def test_shared_weights_path_is_the_tests_one():
    assert emb.SHARED_WEIGHTS.resolve() == SHARED_WEIGHTS.resolve()
