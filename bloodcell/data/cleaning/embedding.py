"""A second outlier score, from what a network sees: the embedding score.

The hand-made features (``features``) say what a stained smear looks like in a dozen numbers; a faint photo
blended over a cell, or a photo patch over one corner, can stay inside all of them. Here each image is
described by the activations of an early layer of a pretrained network (MobileNet, ImageNet weights, the
same builder as training's: ``bloodcell.models.backbones``) or of the project's own trained model:

* **image** -- the mean of each channel over the whole image and the covariance between channels (the
  "style" statistics: which colours and edge patterns occur, and which occur together), scored by a
  scikit-learn detector (Local Outlier Factor by default) against the other images;
* **tiles** -- the mean and spread of each channel of an earlier layer in each tile of a grid, each tile
  scored against the same tile of the other images (k nearest neighbours by default), so that a patch
  over part of an image counts as much as a whole foreign image.

Both become robust z-scores (median and MAD over the images still in the set), against all images and
against the image's own class, the smaller counting (as for the hand-made features), and an image whose
image or worst-tile z passes ``embedding.max_z`` / ``embedding.tile_max_z`` is an ``embedding_outlier``.

Without weights (no ../shared, no Keras cache, no internet) the score is off and a note says so; the
hand-made checks run as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bloodcell import PROJECT_ROOT
from bloodcell.core.errors import UserError
from bloodcell.data.cleaning.features import class_aware, robust_z

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

#: The ImageNet MobileNet (alpha 0.25) weights shared beside the repository, for machines without internet.
SHARED_WEIGHTS: Path = PROJECT_ROOT.parent / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"

DETECTORS = ("lof", "knn", "isolation_forest")


# ------------------------------------------------------------------------------------------- weights


def _keras_cache() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def resolve_weights(backbone_cfg: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(weights to build the backbone with, None) or (None, why the embedding score is off).

    ``auto`` looks, without going online, for MobileNet's ImageNet weights of the configured alpha:
    ../shared/weights (alpha 0.25), then Keras' download cache (~/.keras/models, or $KERAS_HOME)."""
    weights, name = backbone_cfg["weights"], backbone_cfg["name"]
    if weights is None:
        return None, "cleaning.embedding.backbone.weights=null"
    if weights != "auto":
        return str(weights), None
    if name == "mobilenet":
        kwargs = backbone_cfg["kwargs"] or {}  # what the backbone builder passes to Keras' MobileNet
        alpha = float(kwargs["alpha"]) if "alpha" in kwargs else 1.0  # Keras' own width when not given
        tag = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}.get(alpha, "")  # Keras' file naming
        found = [SHARED_WEIGHTS] if tag == "2_5" and SHARED_WEIGHTS.is_file() else []
        found += sorted(_keras_cache().glob(f"mobilenet_{tag}_*_tf_no_top.h5")) if tag else []
        if found:
            return str(found[0]), None
    return None, (
        f"no local {name} weights found ({SHARED_WEIGHTS} or {_keras_cache()}); set "
        "cleaning.embedding.backbone.weights=imagenet to download them once, or to a weights file"
    )


# ----------------------------------------------------------------------------------------- the network


def _statistics(stats_of: Any, tiles: int) -> Any:
    """Two functions of a Keras tensor: image statistics (channel means and upper-triangle covariances) and
    tile statistics (each tile's channel means and standard deviations on a tiles x tiles grid)."""
    import keras
    from keras import ops

    def image(a: Any) -> Any:
        if len(a.shape) == 2:  # a pooled layer: its vector is the description
            return a
        c = a.shape[-1]
        flat = ops.reshape(a, (-1, a.shape[1] * a.shape[2], c))
        mean = ops.mean(flat, axis=1)
        centred = flat - mean[:, None, :]
        cov = ops.einsum("bpi,bpj->bij", centred, centred) / float(flat.shape[1])
        upper = np.flatnonzero(np.triu(np.ones((c, c), bool)))
        return ops.concatenate([mean, ops.take(ops.reshape(cov, (-1, c * c)), upper, axis=1)], axis=1)

    def tile(a: Any) -> Any:
        size = max(1, a.shape[1] // tiles)
        pool = keras.layers.AveragePooling2D(size)
        mean = pool(a)
        std = ops.sqrt(ops.maximum(pool(a * a) - mean * mean, 0.0))
        return ops.concatenate([mean, std], axis=-1)

    return image if stats_of == "image" else tile


def _trained_parts(spec: str, tracking_uri: str | None) -> tuple[list, Any]:
    """The layers before a trained bloodcell model's nested ``backbone`` (resizing, preprocessing) and the
    backbone itself."""
    from bloodcell.serving.loading import load_model

    uri = None
    if spec.startswith(("models:/", "runs:/")):
        from bloodcell.tracking import check_reachable, resolve_tracking_uri

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or resolve_tracking_uri({"uri": None})
        check_reachable(uri)
    model = load_model(spec, tracking_uri=uri)  # looked up there: MLflow's current store is not changed
    names = [layer.name for layer in model.layers]
    if "backbone" not in names:
        raise UserError(
            f"cleaning.embedding.model={spec} has no layer named 'backbone' (not a bloodcell model); "
            "give a model trained here, or model=null for the pretrained backbone"
        )
    chain = [
        layer for layer in model.layers[: names.index("backbone")] if layer.__class__.__name__ != "InputLayer"
    ]
    return chain, model.get_layer("backbone")


def feature_network(
    emb_cfg: Mapping[str, Any], image_shape: tuple[int, ...]
) -> tuple[keras.Model | None, str]:
    """A Keras model from 0-255 float images to [image statistics (B, D), tile statistics (B, g, g, 2C)]
    (tile statistics absent when ``tile_layer`` is null), and a description of it; or (None, why not)."""
    import keras

    from bloodcell.models.backbones import build_backbone, preprocessing_layers

    inputs = keras.Input(tuple(image_shape), name="image")
    x = inputs
    if emb_cfg["model"]:
        chain, backbone = _trained_parts(str(emb_cfg["model"]), emb_cfg["tracking_uri"])
        what = f"model {emb_cfg['model']}"
    else:
        from omegaconf import OmegaConf

        bcfg = dict(emb_cfg["backbone"])
        weights, off = resolve_weights(bcfg)
        if weights is None:
            return None, str(off)
        size = bcfg["input_size"] or image_shape[0]
        backbone = build_backbone(OmegaConf.create({**bcfg, "weights": weights, "input_size": int(size)}))
        chain = (
            [keras.layers.Resizing(size, size)] if tuple(image_shape[:2]) != (size, size) else []
        ) + list(preprocessing_layers(bcfg["name"]))
        what = f"{bcfg['name']} {Path(weights).name if weights != 'imagenet' else 'imagenet'}"
    for layer in chain:
        x = layer(x)
    wanted = {"image": emb_cfg["layer"], "tile": emb_cfg["tile_layer"]}
    if wanted["tile"] is None:
        del wanted["tile"]
    taps = []
    for kind, name in wanted.items():
        if name is None:
            taps.append(backbone.output)
            continue
        try:
            taps.append(backbone.get_layer(name).output)
        except ValueError:
            raise UserError(
                f"cleaning.embedding.{'layer' if kind == 'image' else 'tile_layer'}={name} is not a layer of "
                f"the {what} backbone; e.g. {backbone.layers[3].name}, or null for its pooled output"
            ) from None
    inner = keras.Model(backbone.inputs, taps)
    maps = inner(x, training=False)
    maps = maps if isinstance(maps, list | tuple) else [maps]
    outputs = [_statistics(kind, int(emb_cfg["tiles"]))(m) for kind, m in zip(wanted, maps)]
    return keras.Model(
        inputs, outputs, name="cleaning_embedding"
    ), f"{what}, layer {wanted['image'] or 'pooled'}"


def network_digest(emb_cfg: Mapping[str, Any]) -> str:
    """What the features depend on (not the thresholds), with ``auto`` weights resolved to the file found
    (or to off): names a cached set of features, and enters the cleaning cache key."""
    keys = ("model", "backbone", "layer", "tile_layer", "tiles")
    named = {k: emb_cfg[k] for k in keys}
    if not emb_cfg["model"]:
        named["weights_found"] = resolve_weights(emb_cfg["backbone"])[0]
    return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:12]


# Networks built in this process, by network digest and image shape: a sweep or a test session that
# cleans several data sets builds each pretrained network once. A trained model is loaded every time
# (the registry alias may have moved).
_NETWORKS: dict[tuple[str, tuple[int, ...]], tuple[Any, str]] = {}


def embed(images: np.ndarray, emb_cfg: Mapping[str, Any]) -> tuple[dict[str, np.ndarray] | None, str]:
    """Image and tile statistics of every image ({"image": (N, D), "tiles": (N, g, g, 2C)}), computed in
    batches of ``batch_size``; or (None, why the embedding score is off)."""
    key = (network_digest(emb_cfg), tuple(images.shape[1:]))
    if key in _NETWORKS:
        net, what = _NETWORKS[key]
    else:
        net, what = feature_network(emb_cfg, images.shape[1:])
        if net is not None and not emb_cfg["model"]:
            _NETWORKS.clear()  # one at a time: a network holds a few MB
            _NETWORKS[key] = (net, what)
    if net is None:
        return None, what
    batch = int(emb_cfg["batch_size"])
    parts: list[list[np.ndarray]] = []
    for s in range(0, len(images), batch):
        out = net.predict_on_batch(images[s : s + batch].astype(np.float32))
        out = out if isinstance(out, list | tuple) else [out]
        parts.append([np.asarray(o, np.float32) for o in out])
    names = ["image", "tiles"][: len(parts[0])]
    return {k: np.concatenate([p[i] for p in parts]) for i, k in enumerate(names)}, what


def embed_cached(
    images: np.ndarray, emb_cfg: Mapping[str, Any], cache: Path | None
) -> tuple[dict[str, np.ndarray] | None, str]:
    """:func:`embed`, kept in ``cache`` (an .npz path named after the data and the network) when given, so
    that other thresholds or detectors re-score without running the network again."""
    if cache is not None and cache.is_file():
        try:
            with np.load(cache) as saved:
                kept = {k: saved[k] for k in saved.files if k != "what"}
                if len(kept["image"]) == len(images):
                    return kept, str(saved["what"])
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry is recomputed
    feats, what = embed(images, emb_cfg)
    if cache is not None and feats is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + ".partial.npz")
        payload: dict[str, Any] = {"what": np.array(what), **feats}
        np.savez(tmp, **payload)
        tmp.replace(cache)
    return feats, what


# ------------------------------------------------------------------------------------------- scoring


def detector_scores(x: np.ndarray, detector: str, neighbours: int, seed: int = 0) -> np.ndarray:
    """How odd each row of ``x`` is among the others (higher = odder), by a scikit-learn detector:
    ``lof`` (log Local Outlier Factor), ``knn`` (log mean distance to the k nearest other rows) or
    ``isolation_forest`` (its anomaly score)."""
    # at most half the other rows: with k = all of them every neighbourhood is the same set and LOF is 1
    k = max(1, min(int(neighbours), (len(x) - 1) // 2))
    if detector == "lof":
        from sklearn.neighbors import LocalOutlierFactor

        lof = LocalOutlierFactor(n_neighbors=k).fit(x)
        return np.log(-lof.negative_outlier_factor_)
    if detector == "knn":
        from sklearn.neighbors import NearestNeighbors

        dist, _ = (
            NearestNeighbors(n_neighbors=k).fit(x).kneighbors()
        )  # each row's neighbours, itself left out
        return np.log(dist.mean(1) + 1e-12)
    if detector == "isolation_forest":
        from sklearn.ensemble import IsolationForest

        return -IsolationForest(random_state=seed).fit(x).score_samples(x)
    raise UserError(f"cleaning.embedding detector {detector!r}; use one of {', '.join(DETECTORS)}")


def _standardised_image(feats: np.ndarray, reference: np.ndarray, n_channels: int) -> np.ndarray:
    from sklearn.preprocessing import StandardScaler

    x = feats.astype(np.float64)
    blocks = [x[:, :n_channels], x[:, n_channels:]] if n_channels else [x]
    if n_channels:
        # covariances to the scale of the activations (a signed square root, as a spread is of a variance)
        blocks[1] = np.sign(blocks[1]) * np.sqrt(np.abs(blocks[1]))
    out = []
    for b in blocks:
        if b.shape[1]:
            # each dimension to unit variance, then each block to the same weight, so that 528 covariances
            # do not drown 32 means
            out.append(StandardScaler().fit(b[reference]).transform(b) / np.sqrt(b.shape[1]))
    # float32: scikit-learn's neighbour search runs about twice as fast on it, and z-scores need no more
    return np.concatenate(out, axis=1).astype(np.float32)


def _standardised_tiles(tiles: np.ndarray, reference: np.ndarray) -> np.ndarray:
    x = tiles.astype(np.float64)
    c = x.shape[-1] // 2
    x[..., c:] = np.sqrt(x[..., c:])  # spreads of a positive activation: square root evens out their range
    ref = x[reference].reshape(-1, x.shape[-1])
    return ((x - ref.mean(0)) / (ref.std(0) + 1e-9)).astype(np.float32)


def embedding_z(
    feats: Mapping[str, np.ndarray],
    labels: np.ndarray,
    reference: np.ndarray,
    emb_cfg: Mapping[str, Any],
    min_class_samples: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Robust z-scores of the embedding: (image z (N,), z of each tile (N, tiles * tiles) or None), against
    all images and, with ``per_class`` (``tile_per_class``), against the image's own class, the smaller
    counting. Samples outside ``reference`` (already removed) score 0."""
    n = len(labels)
    image = feats["image"]
    d = image.shape[1]
    # D = C + C(C+1)/2 for mean + covariance statistics; a pooled vector has no covariance part
    c = int(round((-3 + np.sqrt(9 + 8 * d)) / 2))
    n_channels = c if c + c * (c + 1) // 2 == d else 0

    def scorer(x: np.ndarray, detector: str, neighbours: int) -> Callable[[np.ndarray], np.ndarray]:
        """z-scores (positions, members) of the reference samples among ``members``, position by position
        (a tile is compared with the same tile of the other images)."""

        def score(members: np.ndarray) -> np.ndarray:
            ref = reference[members]
            xs = x[members]
            out = np.zeros((xs.shape[1], int(members.sum())))
            if ref.sum() <= neighbours:
                return out
            for p in range(out.shape[0]):
                raw = np.zeros(len(xs))
                raw[ref] = detector_scores(xs[ref, p], detector, neighbours)
                out[p] = np.where(ref, robust_z(raw, +1, ref, 1e-9), 0.0)
            return out

        return score

    def z_of(x: np.ndarray, detector: str, neighbours: int, per_class: bool) -> np.ndarray:
        score = scorer(x, detector, neighbours)
        if per_class:
            # a class too small for its own neighbourhoods (2k + 1 samples) is judged against all images
            return class_aware(score, labels, reference, max(min_class_samples, 2 * neighbours + 1))
        return score(np.ones(n, bool))

    x_image = _standardised_image(image, reference, n_channels)[:, None, :]
    z_image = z_of(x_image, emb_cfg["detector"], int(emb_cfg["neighbours"]), emb_cfg["per_class"])[0]
    z_tiles = None
    if "tiles" in feats:
        t = _standardised_tiles(feats["tiles"], reference)
        z_tiles = z_of(
            t.reshape(n, -1, t.shape[-1]),
            emb_cfg["tile_detector"],
            int(emb_cfg["tile_neighbours"]),
            emb_cfg["tile_per_class"],
        ).T
    return z_image, z_tiles


def tile_summary(z_tiles: np.ndarray, local_tiles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From the z of each tile (N, T): the mean over all tiles (a picture blended over the whole frame makes
    every tile a little odd), the mean of the ``local_tiles`` worst tiles (a patch makes a few tiles very
    odd) and the index of the worst tile."""
    worst = np.sort(z_tiles, axis=1)[:, -max(1, min(local_tiles, z_tiles.shape[1])) :]
    return z_tiles.mean(1), worst.mean(1), z_tiles.argmax(1)
