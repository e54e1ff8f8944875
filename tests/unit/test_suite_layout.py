"""The suite's own layout: tests/unit and tests/e2e are plain folders on pytest's `pythonpath` (no
packages), so two test modules of one file name collide and stop the whole collection ("import file
mismatch"): CI then runs no test at all."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_module_has_a_file_name_of_its_own():
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
