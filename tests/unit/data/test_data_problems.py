"""Data problems say what and where (bloodcell.data): files that are no npz archive, unreadable images in
a folder data set, classes too small or missing for a stratified split. No subprocess, no training."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from bloodcell.core.errors import UserError
from bloodcell.data import Arrays, load_arrays, make_demo_set, read_folder, read_npz, split_arrays
from tests.helpers import cut_short, demo_npz, jpeg_file, truncated_copy, write_image_folder, write_npz


def _truncated(tmp_path: Path) -> Path:
    return truncated_copy(demo_npz(tmp_path))


def _npy(tmp_path: Path) -> Path:
    np.save(tmp_path / "images.npy", np.zeros((2, 4, 4, 3), np.uint8))
    return tmp_path / "images.npy"


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty.npz").write_bytes(b"")
    return tmp_path / "empty.npz"


def _text(tmp_path: Path) -> Path:
    (tmp_path / "notes.npz").write_text("images and labels\n")
    return tmp_path / "notes.npz"


def _garbled_member(tmp_path: Path) -> Path:
    """A complete zip whose compressed array data is damaged (its directory intact)."""
    images, labels = make_demo_set(8, 32, seed=1)
    path = tmp_path / "garbled.npz"
    np.savez_compressed(path, images=images, labels=labels)
    data = bytearray(path.read_bytes())
    middle = len(data) // 3
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "make, fragments",
    [
        (_truncated, ["truncated", "copy or download it again"]),
        (lambda tmp: tmp, ["is a folder", "data=folder"]),
        (lambda tmp: Path("/dev/null"), ["/dev/null is not a regular file"]),
        (jpeg_file, ["is a JPEG image, not an npz archive", "data=folder"]),
        (_npy, ["a single .npy array", "numpy.savez"]),
        (_empty, ["is empty"]),
        (_text, ["not an npz (zip) archive"]),
        (_garbled_member, ["cannot be read", "damaged"]),
    ],
    ids=["truncated", "folder", "dev-null", "jpeg", "npy", "empty", "text", "garbled"],
)
def test_a_file_that_is_no_npz_archive_says_what_it_is(tmp_path, make, fragments):
    path = make(tmp_path)
    with pytest.raises(UserError) as caught:
        read_npz(path)
    assert str(path) in str(caught.value)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


def _folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "cells", per_class=8)


def _damage(folder: Path) -> list[str]:
    """One truncated JPEG and one file that is no image at all; returns their relative paths."""
    cut = sorted((folder / "basophil").iterdir())[0]
    cut_short(cut, 300)
    (folder / "platelet" / "zz.png").write_bytes(b"not a png")
    return [f"basophil/{cut.name}", "platelet/zz.png"]


def test_unreadable_images_of_a_folder_are_skipped_and_named(tmp_path, caplog):
    folder = _folder(tmp_path)
    damaged = _damage(folder)
    with caplog.at_level(logging.WARNING, logger="bloodcell.data"):
        arrays = load_arrays(OmegaConf.create({"format": "folder", "path": str(folder)}))
    assert len(arrays) == 64 - 1 and arrays.skipped == damaged
    assert "skipped 2 image file(s)" in caplog.text and all(name in caplog.text for name in damaged)
    assert "data.strict=true" in caplog.text


def test_a_strict_folder_refuses_unreadable_images(tmp_path):
    folder = _folder(tmp_path)
    _damage(folder)
    with pytest.raises(UserError, match=r"2 image file\(s\) cannot be read .*basophil/.*data.strict=false"):
        read_folder(folder, strict=True)


def test_a_class_too_small_to_stratify_trains_only_and_is_named(caplog):
    images, labels = make_demo_set(10, 8, seed=0)
    keep = np.r_[np.flatnonzero(labels != 0), np.flatnonzero(labels == 0)[:2]]  # 2 basophils
    arrays = Arrays(images[keep], labels[keep], "f", "cells.npz")
    with caplog.at_level(logging.WARNING, logger="bloodcell.data"):
        splits = split_arrays(arrays, 0.15, 0.15, seed=0)
    assert "basophil" in caplog.text and "training split" in caplog.text
    assert (
        (splits.train.labels == 0).sum() == 2 and 0 not in splits.val.labels and 0 not in splits.test.labels
    )
    for part in (splits.train, splits.val, splits.test):  # every other class is still in every part
        assert set(range(1, 8)) <= set(part.labels.tolist())


def test_one_class_is_an_error_and_a_missing_class_a_warning(tmp_path, caplog):
    images, labels = make_demo_set(10, 8, seed=0)
    one = write_npz(tmp_path / "one.npz", images, np.full(len(labels), 4))
    with pytest.raises(UserError, match="all 80 images are of one class \\(lymphocyte\\)"):
        load_arrays(OmegaConf.create({"format": "npz", "path": str(one)}))
    seven = write_npz(tmp_path / "seven.npz", images[labels != 7], labels[labels != 7])
    with caplog.at_level(logging.WARNING, logger="bloodcell.data"):
        load_arrays(OmegaConf.create({"format": "npz", "path": str(seven)}))
    assert "no images of platelet" in caplog.text


def test_a_limit_below_the_class_count_still_subsets():
    """data.limit below what stratification can do (more classes than images left out) subsets at random
    instead of raising scikit-learn's error."""
    arrays = load_arrays(OmegaConf.create({"format": "demo", "per_class": 10, "image_size": 8, "limit": 75}))
    assert len(arrays) == 75 and "data.limit=75" in arrays.source
