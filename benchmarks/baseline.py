"""Another commit's code beside this checkout, for benchmarks that print before/after side by side in one
run (``--baseline <commit>``: overhead.py, trial_overhead.py)."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """A git worktree of ``ref`` beside this checkout (so that its ``../shared`` is this one's), removed
    after."""
    folder = Path(tempfile.mkdtemp(prefix=".baseline-", dir=ROOT.parent))
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(folder), ref], cwd=ROOT, check=True)
    try:
        yield folder
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT, check=False)
