"""The suite's own layout: tests/ is a package and every folder under it that holds Python files is one too,
so pytest imports each test module by its full dotted name (tests.unit.data.test_data,
tests.e2e.test_train, ...) from the repository root. Two test modules of one file name in different folders
then cannot collide ("import file mismatch", which stops the whole collection: CI then runs no test at all);
a folder without __init__.py would bring that back, hence this test."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_folder_of_the_suite_is_a_package():
    folders = {path.parent for path in TESTS.rglob("*.py") if "__pycache__" not in path.parts}
    not_packages = [str(f.relative_to(TESTS.parent)) for f in folders if not (f / "__init__.py").is_file()]
    assert sorted(not_packages) == []


def test_test_modules_are_imported_by_their_dotted_name():
    import tests.conftest  # the conftest of the package `tests`, not a top-level `conftest`

    assert Path(tests.conftest.__file__).resolve() == TESTS / "conftest.py"
    assert __name__ == "tests.unit.test_suite_layout"
