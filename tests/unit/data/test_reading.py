"""How a run's pixels are read: an npz's uncompressed images in one read into an aligned buffer that
TensorFlow shares (bloodcell.data.buffers), checked against the archive's CRC; the input checked from the
labels first, the pixels read and cut in a background thread (bloodcell.training.run_data.start_loading)."""

from __future__ import annotations

import threading
import zipfile

import numpy as np
import pytest
from omegaconf import OmegaConf

from bloodcell.core.errors import UserError
from bloodcell.core.settings import DataSchema
from bloodcell.data import load_arrays, make_demo_set, read_npz, split_arrays
from bloodcell.data.buffers import ALIGNMENT, aligned_empty, aligned_take, host_tensor, shares_with_tensorflow
from bloodcell.data.formats import StoredArray
from bloodcell.training.run_data import start_loading
from tests.helpers import write_npz


def npz_settings(path, **kw) -> DataSchema:
    base = {"format": "npz", "path": str(path), "val_fraction": 0.25, "test_fraction": 0.25, "limit": None}
    return DataSchema.of(OmegaConf.create({**base, **kw}))


@pytest.fixture
def cells(tmp_path):
    images, labels = make_demo_set(6, 16, seed=5)
    return write_npz(tmp_path / "cells.npz", images, labels.astype(np.uint8).reshape(-1, 1)), images, labels


@pytest.fixture
def direct_reads(monkeypatch) -> list[threading.Thread]:
    """The threads that read an npz member straight into memory (`StoredArray.read`), one per read."""
    threads: list[threading.Thread] = []
    read = StoredArray.read

    def recorded(self):
        threads.append(threading.current_thread())
        return read(self)

    monkeypatch.setattr(StoredArray, "read", recorded)
    return threads


def flip_a_pixel(path) -> None:
    """Damage one byte of an npz's stored images (its zip directory intact)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("images.npy")
    data = bytearray(path.read_bytes())
    data[info.header_offset + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "compressed"])
def test_an_npz_reads_the_same_arrays_as_np_load_into_aligned_memory(tmp_path, compressed, direct_reads):
    images, labels = make_demo_set(6, 16, seed=5)
    path = tmp_path / "cells.npz"
    (np.savez_compressed if compressed else np.savez)(path, images=images, labels=labels.reshape(-1, 1))
    x, y = read_npz(path)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    # np.savez's stored member is read straight into an aligned buffer; a compressed one goes through np.load
    assert len(direct_reads) == (0 if compressed else 1)
    if not compressed:
        assert x.ctypes.data % ALIGNMENT == 0 and x.flags.writeable


def test_a_stored_member_with_damaged_pixels_fails_its_crc(cells):
    path, _, _ = cells
    flip_a_pixel(path)
    with pytest.raises(UserError, match="bad CRC-32 for images.npy.*damaged"):
        read_npz(path)


def test_a_split_is_cut_into_memory_tensorflow_shares(cells):
    path, images, _ = cells
    arrays = load_arrays(npz_settings(path))
    splits = split_arrays(arrays, 0.25, 0.25, seed=1)
    for part in ("train", "val", "test"):
        cut = getattr(splits, part)
        assert shares_with_tensorflow(cut.images)
        np.testing.assert_array_equal(cut.images, images[splits.positions(part)])
    tensor = host_tensor(splits.train.images)
    splits.train.images[0, 0, 0, 0] ^= 0xFF  # shared memory: the tensor sees the write
    assert int(tensor[0, 0, 0, 0]) == splits.train.images[0, 0, 0, 0]


def test_an_unaligned_array_is_copied_for_tensorflow():
    unaligned = aligned_empty((1 + 4 * 3 * 3 * 3,), np.uint8)[1:].reshape(4, 3, 3, 3)
    unaligned[:] = 0
    assert not shares_with_tensorflow(unaligned)
    tensor = host_tensor(unaligned)
    unaligned[0, 0, 0, 0] = 7
    assert int(tensor[0, 0, 0, 0]) == 0  # a copy, taken before the write


def test_aligned_take_checks_its_positions():
    array = np.arange(10 * 2).reshape(10, 2)
    np.testing.assert_array_equal(aligned_take(array, np.array([3, 1, -1])), array[[3, 1, -1]])
    np.testing.assert_array_equal(aligned_take(array, array[:, 0] > 12), array[array[:, 0] > 12])
    with pytest.raises(IndexError):
        aligned_take(array, np.array([0, 10]))


def test_start_loading_reads_the_pixels_in_another_thread_and_splits_as_before(cells, direct_reads):
    path, images, labels = cells
    data = start_loading(npz_settings(path), seed=3).result()
    assert direct_reads and threading.main_thread() not in direct_reads
    # the same split as cutting the arrays read in the main thread
    expected = split_arrays(load_arrays(npz_settings(path)), 0.25, 0.25, seed=42)  # data.split_seed
    assert data.splits.fingerprint() == expected.fingerprint()
    np.testing.assert_array_equal(data.splits.test.images, images[expected.positions("test")])
    np.testing.assert_array_equal(data.arrays.labels, labels)


def test_start_loading_says_what_is_wrong_with_the_labels_before_reading_pixels(tmp_path, monkeypatch):
    images, labels = make_demo_set(6, 16, seed=5)
    labels[0] = 9
    path = write_npz(tmp_path / "cells.npz", images, labels)
    monkeypatch.setattr(StoredArray, "read", lambda self: pytest.fail("pixels read before the labels' check"))
    with pytest.raises(UserError, match="labels outside 0-7"):
        start_loading(npz_settings(path), seed=3)


def test_damaged_pixels_are_reported_by_the_result(cells):
    path, _, _ = cells
    flip_a_pixel(path)
    loading = start_loading(npz_settings(path), seed=3)  # the labels and the layout are fine
    with pytest.raises(UserError, match="damaged"):
        loading.result()
