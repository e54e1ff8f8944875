"""TensorFlow's start-up noise, filtered out of stderr while TensorFlow loads.

On a machine without a GPU every command used to open with lines such as::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 ... port.cc:153] oneDNN custom operations are on. ...
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
    E0000 ... cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: ...

``TF_CPP_MIN_LOG_LEVEL`` cannot stop them: TensorFlow's C++ libraries log through Abseil, which writes
*every* message to stderr until ``absl::InitializeLog()`` runs, and TensorFlow 2.21 logs before calling
it (abseil-cpp#1718, tensorflow#102212); the cuInit line is an ERROR, above level 2, though on a machine
without a CUDA driver it only says there is no GPU. Nothing in the environment reaches Abseil's thresholds
before the libraries load, so the one place to act is stderr itself: `install` wraps the first
``import tensorflow`` (whoever makes it: keras, bloodcell, a user's script) so that, while TensorFlow
loads and finds its devices, file descriptor 2 goes to a temporary file; afterwards every line is written
back except

- Abseil-format lines (``I0000 ...``) below ``TF_CPP_MIN_LOG_LEVEL``, as TensorFlow filters them once its
  logging is set up, and Abseil's "before InitializeLog" banner;
- the cuInit failure, only when the same start-up said no CUDA driver is installed (with a driver it is a
  real error and stays).

Python warnings, tracebacks and every other line pass. ``TF_CPP_MIN_LOG_LEVEL=0`` turns the filter off,
to see all that TensorFlow prints.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

#: Abseil/glog line prefix: severity letter, then MMDD
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} ")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
_BANNER = "All log messages before absl::InitializeLog() is called are written to STDERR"
_NO_DRIVER = "Could not find cuda drivers on your machine"
_CUINIT = "failed call to cuInit"


def min_log_level() -> int:
    """TensorFlow's C++ log threshold (0 = everything, 2 = errors only), as TF reads it."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def filter_lines(text: str, level: int) -> str:
    """``text`` less the start-up noise described in the module docstring."""
    lines = text.splitlines(keepends=True)
    no_driver = any(_NO_DRIVER in line for line in lines)
    kept = []
    for line in lines:
        match = _ABSL_LINE.match(line)
        if _BANNER in line or (match and _SEVERITY[match.group(1)] < level):
            continue
        if no_driver and _CUINIT in line:
            continue
        kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def filtered_stderr(level: int) -> Iterator[None]:
    """Route file descriptor 2 to a temporary file for the block, then write back what `filter_lines`
    keeps (a file, not a pipe: no reader thread, and no writer blocks on a full pipe)."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = filter_lines(captured.read().decode(errors="replace"), level)
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _QuietLoader:
    """TensorFlow's own loader, run under `filtered_stderr`, then asked for its devices (the cuInit
    attempt happens there); anything else is delegated (resource readers, get_filename, ...)."""

    def __init__(self, loader: Any, level: int) -> None:
        self._loader = loader
        self._level = level

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with filtered_stderr(self._level):
            self._loader.exec_module(module)
            with contextlib.suppress(Exception):  # a broken install raises later, unfiltered
                module.config.list_physical_devices()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _Finder:
    """A meta-path finder for the top-level ``tensorflow`` package only, used once."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        uninstall()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader, min_log_level())  # type: ignore[assignment]
        return spec


_finder = _Finder()


def install() -> None:
    """Filter TensorFlow's start-up noise when it is first imported (no-op when it already is, or when
    ``TF_CPP_MIN_LOG_LEVEL=0`` asks for every line)."""
    if "tensorflow" in sys.modules or min_log_level() < 1 or _finder in sys.meta_path:
        return
    sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    with contextlib.suppress(ValueError):
        sys.meta_path.remove(_finder)
