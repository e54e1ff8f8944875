"""Files the commands write (predictions, cleaned sets, submission bundles, reports): an existing file is
never replaced unless asked, and a file appears under its final name only when it is complete. A command
that fails part-way (a full disk, Ctrl-C, a bug) leaves neither a truncated file under the final name nor a
temporary one, so a rerun is not refused because the output "exists"."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from bloodcell.core.errors import UserError


def check_output(output: str | None, overwrite: bool, suffixes: tuple[str, ...], example: str) -> Path:
    """The output path, refused (one line) when missing, of another kind, or existing without overwrite."""
    if not output:
        raise UserError(f"say where to write: output={example}")
    path = Path(output).expanduser()
    if path.suffix not in suffixes:
        raise UserError(f"output={output} must end in {' or '.join(suffixes)}")
    if path.exists() and not overwrite:
        raise UserError(f"output {path} exists; choose another name or pass overwrite=true")
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same folder, so the rename is atomic; same suffix, which numpy's
    writers insist on) to write to; renamed to ``path`` when the block ends without error, removed if not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
