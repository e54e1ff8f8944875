"""Reading a PyTorch state dict without torch: tensors come back with their dtypes, offsets and strides in
both of torch.save's layouts, and a pickle that asks for anything but the tensor globals is refused in one
line, before any of it runs."""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bloodcell.core.errors import UserError
from bloodcell.models.torch_state_dict import read_state_dict

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class FakeStorage:
    def __init__(self, key: str, kind: type, values: np.ndarray) -> None:
        self.key, self.kind, self.values = key, kind, values


class FakeTensor:
    def __init__(self, storage: FakeStorage, offset: int, shape: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def __reduce__(self):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        hooks = collections.OrderedDict()
        return rebuild, (self.storage, self.offset, self.shape, self.stride, False, hooks)


class TorchLikePickler(pickle.Pickler):
    """Pickles as torch.save does: storages as persistent ids, tensors through _rebuild_tensor_v2."""

    def __init__(self, file, legacy: bool) -> None:
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            pid = ("storage", obj.kind, obj.key, "cpu", obj.values.size)
            return (*pid, None) if self.legacy else pid
        return None


@pytest.fixture
def fake_torch(monkeypatch):
    """Modules named torch and torch._utils, so that pickle writes the globals torch.save writes."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("the reader must never call a function named in the file")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("FloatStorage", "LongStorage"):
        kind = type(name, (), {"__module__": "torch"})
        setattr(torch, name, kind)
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def dumps(obj, legacy: bool) -> bytes:
    buffer = io.BytesIO()
    TorchLikePickler(buffer, legacy).dump(obj)
    return buffer.getvalue()


def write_pth(path: Path, state: dict, storages: list[FakeStorage], legacy: bool) -> Path:
    if legacy:
        with path.open("wb") as f:
            for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
                f.write(pickle.dumps(header, protocol=2))
            f.write(dumps(state, legacy=True))
            f.write(pickle.dumps([s.key for s in storages], protocol=2))
            for storage in storages:
                f.write(storage.values.size.to_bytes(8, "little"))
                f.write(storage.values.tobytes())
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", dumps(state, legacy=False))
            for storage in storages:
                archive.writestr(f"archive/data/{storage.key}", storage.values.tobytes())
    return path


@pytest.mark.parametrize("legacy", [True, False], ids=["torch-before-1.6", "zip"])
def test_tensors_come_back_with_dtype_offset_shape_and_stride(tmp_path, fake_torch, legacy):
    floats = FakeStorage("0", fake_torch.FloatStorage, np.arange(10, dtype=np.float32))
    longs = FakeStorage("1", fake_torch.LongStorage, np.array([7], dtype=np.int64))
    state = collections.OrderedDict(
        # a transposed view that starts one element in: element [i, j] is storage[1 + i + 3 j]
        conv=FakeTensor(floats, 1, (3, 2), (1, 3)),
        head=FakeTensor(floats, 0, (2, 5), (5, 1)),
        steps=FakeTensor(longs, 0, (), ()),
    )
    path = write_pth(tmp_path / "weights.pth", state, [floats, longs], legacy)
    tensors = read_state_dict(path)
    assert list(tensors) == ["conv", "head", "steps"]
    np.testing.assert_array_equal(tensors["conv"], [[1, 4], [2, 5], [3, 6]])
    np.testing.assert_array_equal(tensors["head"], np.arange(10).reshape(2, 5))
    assert tensors["conv"].dtype == np.float32 and tensors["steps"].dtype == np.int64
    assert tensors["steps"].shape == () and tensors["steps"] == 7


def test_a_tensor_reaching_outside_its_storage_is_refused(tmp_path, fake_torch):
    floats = FakeStorage("0", fake_torch.FloatStorage, np.arange(4, dtype=np.float32))
    state = {"w": FakeTensor(floats, 2, (2, 2), (2, 1))}
    path = write_pth(tmp_path / "weights.pth", state, [floats], legacy=False)
    with pytest.raises(UserError, match="reaches outside its storage"):
        read_state_dict(path)


class RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy", [True, False], ids=["torch-before-1.6", "zip"])
def test_a_pickle_that_would_run_code_is_refused_in_one_line_before_it_runs(tmp_path, legacy):
    marker = tmp_path / "ran"
    payload = pickle.dumps(collections.OrderedDict(w=RunsACommand(marker)), protocol=2)
    path = tmp_path / "evil.pth"
    if legacy:
        headers = (LEGACY_MAGIC, 1001, {"little_endian": True})
        path.write_bytes(b"".join(pickle.dumps(h, protocol=2) for h in headers) + payload)
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", payload)
    with pytest.raises(UserError) as refused:
        read_state_dict(path)
    message = str(refused.value)
    assert "\n" not in message
    assert f"asks for {os.system.__module__}.system" in message and "evil.pth" in message
    assert not marker.exists()


def test_a_file_that_is_no_state_dict_is_refused_in_one_line(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"just some text")
    with pytest.raises(UserError, match="notes.pth: not") as refused:
        read_state_dict(path)
    assert "\n" not in str(refused.value)
