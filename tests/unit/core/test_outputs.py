"""Output files appear whole or not at all (bloodcell.core.outputs)."""

from __future__ import annotations

import numpy as np
import pytest

from bloodcell.core.errors import UserError
from bloodcell.core.outputs import atomic_path, check_output


def test_a_failure_part_way_leaves_neither_the_final_name_nor_a_temporary_file(tmp_path):
    target = tmp_path / "out" / "pred.csv"
    with pytest.raises(RuntimeError), atomic_path(target) as partial:
        partial.write_text("image,class_id\nhalf a ro")
        raise RuntimeError("disk full")
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_a_complete_write_lands_under_the_final_name_with_numpy_s_suffix_rules(tmp_path):
    target = tmp_path / "table.npy"
    with atomic_path(target) as partial:
        np.save(partial, np.arange(3))  # numpy would append .npy to a name without it
    assert np.load(target).tolist() == [0, 1, 2] and sorted(p.name for p in tmp_path.iterdir()) == [
        "table.npy"
    ]


def test_an_existing_output_is_refused_unless_overwrite(tmp_path):
    existing = tmp_path / "pred.csv"
    existing.write_text("keep me")
    with pytest.raises(UserError, match="exists; choose another name or pass overwrite=true"):
        check_output(str(existing), False, (".csv",), "<file.csv>")
    assert check_output(str(existing), True, (".csv",), "<file.csv>") == existing
    with pytest.raises(UserError, match=r"must end in \.csv"):
        check_output(str(tmp_path / "p.txt"), False, (".csv",), "<file.csv>")
