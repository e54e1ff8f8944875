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


def test_a_module_with_module_fixtures_keeps_its_tests_on_one_xdist_worker():
    """pytest-xdist (`-n 2 --dist loadgroup` in pyproject.toml) spreads single tests over its workers; a
    module-scoped fixture (a trained run, a sweep) is then built once per worker that gets one of the
    module's tests. An `xdist_group` mark keeps such a module's tests together, so it is built once."""
    ungrouped = [
        path.name
        for path in TESTS.rglob("test_*.py")
        if path != Path(__file__).resolve()
        and 'scope="module"' in (text := path.read_text())
        and "pytest.mark.xdist_group(" not in text
    ]
    assert ungrouped == []
