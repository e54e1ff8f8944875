"""Pixel arrays that TensorFlow can use without copying them.

TensorFlow takes over a NumPy array's memory (DLPack) only when it starts on a 64-byte boundary (Eigen's
alignment); NumPy's own large allocations start 16 bytes past one, so ``tf.constant`` copies them. A data
set's pixels are therefore read and cut into buffers allocated here, and the input pipeline holds no second
copy of them: for the competition's 13,659 cells one 378 MB copy less per run, ~0.7 s on a machine that
faults fresh memory in slowly (docs/benchmarks.md), and that much less memory at its peak.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

#: the boundary TensorFlow wants a shared buffer to start on (EIGEN_MAX_ALIGN_BYTES of its x86 builds)
ALIGNMENT = 64


#: from this size on, a buffer is mapped with its pages in place (MAP_POPULATE): one call, where filling
#: fresh memory takes a page fault per 4 KB. A virtual machine makes faults slow: 378 MB took 0.5-0.9 s of
#: faults here, 0.12 s populated, and a thread that faults slows the main thread's imports (mm lock).
POPULATE_BYTES = 16 << 20


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `ALIGNMENT` boundary (a page boundary
    for a large one, `POPULATE_BYTES`)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size >= POPULATE_BYTES and hasattr(mmap, "MAP_POPULATE"):  # Linux
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
        return np.frombuffer(mmap.mmap(-1, size, flags=flags), dtype).reshape(shape)
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + size].view(dtype).reshape(shape)


def aligned_take(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``array[index]`` along the first axis (positions or a boolean mask) into an `aligned_empty` array."""
    index = np.asarray(index)
    if index.dtype == bool:
        index = np.flatnonzero(index)
    if index.size and (index.min() < -len(array) or index.max() >= len(array)):
        raise IndexError(f"positions {index.min()}..{index.max()} outside an array of {len(array)}")
    out = aligned_empty((len(index), *array.shape[1:]), array.dtype)
    # mode="wrap" (bounds checked above) writes straight into ``out``; the default "raise" would fill a
    # temporary array first: one more fresh copy of the pixels
    np.take(array, index, axis=0, out=out, mode="wrap")
    return out


def shares_with_tensorflow(array: np.ndarray) -> bool:
    """Whether `host_tensor` can hand ``array``'s memory to TensorFlow as it is (NumPy exports no read-only
    array through DLPack)."""
    return (
        array.size > 0
        and array.flags.c_contiguous
        and array.flags.writeable
        and array.ctypes.data % ALIGNMENT == 0
    )


def host_tensor(array: np.ndarray) -> tf.Tensor:
    """A tensor in host memory with ``array``'s values: over the same memory when TensorFlow can take it
    (`shares_with_tensorflow`; nothing writes into a data set's pixels once they are cut), else a copy."""
    import tensorflow as tf

    if shares_with_tensorflow(array):
        return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    with tf.device("/CPU:0"):
        return tf.constant(array)
