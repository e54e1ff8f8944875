"""Grad-CAM and the sheets of what a model looked at (bloodcell.explain), on small real Keras models."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from bloodcell import CLASS_NAMES
from bloodcell.core.errors import UserError
from bloodcell.evaluation.gradcam import (
    ERRORS_SHOWN,
    GradCam,
    NoFeatureMap,
    Sheet,
    errors_sheet,
    gradcam_grid,
    sheets,
    showcase,
)
from bloodcell.explain import check_output
from tests.helpers import SHARED_WEIGHTS, needs_shared_weights


def red_detector(pool: bool, nested: bool):
    """A model whose class 0 is "how red the image is": a 1x1 conv copies the red channel (and a second
    channel the blue one), global pooling, and a softmax where class 0 weighs red and class 1 blue. Grad-CAM
    for class 0 must then light up the red pixels and nothing else. With ``nested`` the conv part is a
    model inside the model, as a bloodcell backbone is."""
    import keras
    from keras import layers

    inputs = keras.Input((16, 16, 3))
    x = layers.Rescaling(1 / 255.0)(inputs)
    conv = layers.Conv2D(2, 1, use_bias=False, name="features")
    x = conv(x)
    x = layers.MaxPooling2D(name="pool")(x) if pool else x
    x = layers.GlobalAveragePooling2D()(x)
    if nested:
        inner = keras.Model(inputs, x, name="backbone")
        outer_input = keras.Input((16, 16, 3))
        x, inputs = inner(outer_input), outer_input
    dense = layers.Dense(8, activation="softmax", name="probabilities")
    model = keras.Model(inputs, dense(x))
    conv.set_weights([np.array([[[[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]]], dtype=np.float32)])
    kernel = np.zeros((2, 8), np.float32)
    kernel[0, 0], kernel[1, 1] = 5.0, 5.0
    dense.set_weights([kernel, np.zeros(8, np.float32)])
    return model


def red_square_images() -> np.ndarray:
    """Two 16x16 images: a red square top-left on a blue-ish background, and one bottom-right."""
    images = np.zeros((2, 16, 16, 3), np.uint8)
    images[..., 2] = 60
    images[0, 2:6, 2:6] = (255, 0, 0)
    images[1, 9:15, 10:15] = (255, 0, 0)
    return images


@pytest.mark.parametrize("pool", [False, True], ids=["same size", "upsampled"])
def test_gradcam_lights_up_what_the_class_score_depends_on(pool):
    images = red_square_images()
    cam = GradCam.of(red_detector(pool, nested=False))
    maps, probabilities = cam.heatmaps(images, classes=np.array([0, 0]))
    assert cam.layer == ("pool" if pool else "features")
    assert maps.shape == (2, 16, 16) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert probabilities.shape == (2, 8) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    for heat, (rows, cols) in zip(maps, [(slice(2, 6), slice(2, 6)), (slice(9, 15), slice(10, 15))]):
        inside = np.zeros((16, 16), bool)
        inside[rows, cols] = True
        assert inside[np.unravel_index(heat.argmax(), heat.shape)]  # the peak sits on the red square
        assert heat[inside].mean() > 0.5 > heat[~inside].mean()
        if not pool:  # no resizing: exactly the red channel, scaled to a maximum of 1
            np.testing.assert_allclose(heat, inside.astype(np.float32), atol=1e-5)
    # the blue class's evidence is the background, everywhere but the square
    blue = cam.heatmaps(images[:1], classes=np.array([1]))[0][0]
    assert blue[10:, 10:].mean() > blue[2:6, 2:6].mean()


def test_a_nested_backbone_gives_the_same_heat_maps_as_the_flat_model():
    images = red_square_images()
    cam = GradCam.of(red_detector(pool=True, nested=True))
    assert cam.layer == "backbone/pool"
    flat = GradCam.of(red_detector(pool=True, nested=False)).heatmaps(images)[0]
    np.testing.assert_allclose(cam.heatmaps(images)[0], flat, atol=1e-5)


def test_the_class_score_is_the_logit_also_under_a_weightless_last_layer():
    """A calibrated model ends with temperature scaling, a layer without weights after the softmax: the score
    stays the Dense layer's logit, and the heat maps those of the model without it."""
    import keras

    images = red_square_images()
    model = red_detector(pool=True, nested=True)
    plain = GradCam.of(model)
    assert plain.logits is model.get_layer("probabilities")
    after = keras.Model(model.inputs, keras.layers.Activation("linear", name="after")(model.outputs[0]))
    cam = GradCam.of(after)
    assert cam.logits is model.get_layer("probabilities")
    np.testing.assert_allclose(cam.heatmaps(images)[0], plain.heatmaps(images)[0], atol=1e-6)


def test_a_model_without_a_conv_layer_is_a_clear_error_and_the_run_sheets_skip_it(caplog):
    import keras
    from keras import layers

    inputs = keras.Input((16, 16, 3))
    x = layers.Flatten()(layers.Rescaling(1 / 255.0)(inputs))  # Rescaling's output is 4-D but no conv
    model = keras.Model(inputs, layers.Dense(8, activation="softmax")(x), name="dense_only")
    with pytest.raises(NoFeatureMap, match="model dense_only has no convolutional layer"):
        GradCam.of(model)
    with pytest.raises(UserError, match="no layer named 'conv_pw_13_relu'"):
        GradCam.of(red_detector(False, False), "conv_pw_13_relu")
    images = red_square_images()
    labels = np.array([0, 1])
    with caplog.at_level(logging.WARNING, logger="bloodcell.explain"):
        drawn = sheets(model, images, labels, model.predict(images, verbose=0))
    assert set(drawn) == {"errors"}  # the error sheet still, no Grad-CAM sheet, no exception
    assert "no Grad-CAM sheet: model dense_only has no convolutional layer" in caplog.text


def test_showcase_and_error_sheet_pick_the_most_confident_and_count_all_errors():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 20)
    probabilities = rng.dirichlet(np.ones(8), size=len(labels)).astype(np.float32)
    picks = showcase(labels, probabilities)
    predicted, confidence = probabilities.argmax(1), probabilities.max(1)
    for c, right, wrong in picks:
        assert right is None or (labels[right] == c == predicted[right])
        assert wrong is not None and labels[wrong] == c != predicted[wrong]
        same = (labels == c) & (predicted != c)
        assert confidence[wrong] == confidence[same].max()
    errors = int((predicted != labels).sum())
    assert errors > ERRORS_SHOWN
    images = rng.integers(0, 255, (len(labels), 8, 8, 3), dtype=np.uint8)
    sheet = errors_sheet(images, labels, probabilities)
    assert sheet.title == (
        f"{errors} test errors of {len(labels)} images, the {ERRORS_SHOWN} most confident shown"
    )
    # one picture of the tiles (8 per row), the most confident error first, each under its caption
    wrong = np.flatnonzero(predicted != labels)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:ERRORS_SHOWN]
    captions = [text for _, _, text, _, _ in sheet.texts]
    assert len(captions) == ERRORS_SHOWN
    first = shown[0]
    assert captions[0] == (
        f"true {CLASS_NAMES[labels[first]]}\npred {CLASS_NAMES[predicted[first]]} {confidence[first]:.2f}"
    )
    canvas = sheet.canvas
    band = canvas.shape[0] // 8 - 8  # 8 rows of an 8-pixel tile under its caption band
    gap = canvas.shape[1] // 8 - 8
    for k, i in enumerate(shown):
        row, column = divmod(k, 8)
        top, left = row * (band + 8) + band, column * (8 + gap)
        np.testing.assert_array_equal(canvas[top : top + 8, left : left + 8], images[i])


def test_the_page_is_the_title_over_the_tiles_enlarged_whole_with_their_captions(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (3, 10, 10, 3), dtype=np.uint8)
    probabilities = np.eye(8, dtype=np.float32)[[1, 2, 3]]
    sheet = errors_sheet(images, np.array([0, 0, 0]), probabilities, columns=2)
    sheet.save(tmp_path / "errors.png")
    page = np.asarray(Image.open(tmp_path / "errors.png").convert("RGB"))
    scale = sheet.scale
    assert scale == 19 and page.shape[1] == sheet.canvas.shape[1] * scale
    header = page.shape[0] - sheet.canvas.shape[0] * scale
    assert header > 2 * Sheet.TITLE_FONT  # the title's line above the grid
    assert (page[:header] < 128).any()  # ... drawn in black on white
    # every canvas pixel is a scale x scale block of the page, below the title: the tiles unblurred
    for k in range(3):
        row, column = divmod(k, 2)
        top = header + (row * (sheet.band + 10) + sheet.band) * scale
        left = column * (10 + sheet.gap) * scale
        tile = page[top : top + 10 * scale : scale, left : left + 10 * scale : scale]
        np.testing.assert_array_equal(tile, images[k])
        caption_band = page[top - sheet.band * scale : top, left : left + 10 * scale]
        assert (caption_band < 128).any()  # the caption's dark text over its tile
    assert sheet.png() == (tmp_path / "errors.png").read_bytes()


def test_unlabelled_images_each_get_a_tile_beside_their_heat_map_named_by_file():
    cam = GradCam.of(red_detector(pool=True, nested=True))
    sheet = gradcam_grid(cam, red_square_images(), ["cells/a.png", "cells/b.png"], "two cells")
    titles = [text for _, _, text, _, _ in sheet.texts]  # image, heat map, image, heat map
    assert len(titles) == 4 and titles[0].startswith(
        "cells/a.png\npred eosinophil"
    )  # the blue class: more blue than red
    assert titles[2].startswith("cells/b.png") and "feature map backbone/pool" in sheet.title


def test_the_command_refuses_to_overwrite_sheets_or_to_write_into_a_file(tmp_path):
    assert check_output(str(tmp_path / "new"), False) == tmp_path / "new"
    (tmp_path / "gradcam.png").write_bytes(b"keep me")
    with pytest.raises(UserError, match="gradcam.png exists; choose another name or pass overwrite=true"):
        check_output(str(tmp_path), False)
    assert check_output(str(tmp_path), True) == tmp_path
    with pytest.raises(UserError, match="is a file"):
        check_output(str(tmp_path / "gradcam.png"), True)


def test_the_command_refuses_labels_that_are_no_class_before_loading_a_model(tmp_path):
    from bloodcell.core.cli import compose
    from bloodcell.explain import explain

    np.savez(tmp_path / "cells.npz", images=np.zeros((3, 16, 16, 3), np.uint8), labels=np.array([0, 9, 2]))
    cfg = compose([f"input={tmp_path / 'cells.npz'}", f"output={tmp_path / 'out'}", "model=none"], "explain")
    with pytest.raises(UserError, match="labels outside 0-7 "):
        explain(cfg)
    assert not (tmp_path / "out").exists()


@needs_shared_weights
def test_gradcam_finds_mobilenet_s_last_conv_inside_the_nested_backbone():
    from bloodcell.core.cli import compose
    from bloodcell.data import make_demo_set
    from bloodcell.models import build_model

    cfg = compose(["backbone=mobilenet", f"backbone.weights={SHARED_WEIGHTS}", "backbone.input_size=96"])
    model = build_model(cfg, (32, 32, 3))
    images, labels = make_demo_set(1, 32, seed=3)
    cam = GradCam.of(model)
    maps, probabilities = cam.heatmaps(images)
    assert cam.layer == "backbone/conv_pw_13_relu"
    assert maps.shape == (8, 32, 32) and maps.min() >= 0.0 and maps.max() <= 1.0
    assert maps.max() > 0.5  # a gradient reached the feature map (a broken one gives all zeros)
    np.testing.assert_allclose(probabilities, model.predict(images, verbose=0), atol=1e-5)
    drawn = sheets(model, images, labels, probabilities)
    assert set(drawn) == {"errors", "gradcam"}
