"""Storage URLs and trial ids (bloodcell.trial), and the public Optuna calls the sweeper relies on."""

from __future__ import annotations

import optuna
import pytest

from bloodcell import PROJECT_ROOT
from bloodcell.core.errors import UserError
from bloodcell.sweep.trial import DEFAULT_JOURNAL, lock_path, open_storage, redact, resolve_storage_url


def test_storage_urls_resolve_from_the_project_root(tmp_path):
    assert resolve_storage_url(None) == f"journal:{DEFAULT_JOURNAL}"
    assert resolve_storage_url("") == f"journal:{DEFAULT_JOURNAL}"
    assert (
        resolve_storage_url("journal:mlruns/x.journal") == f"journal:{PROJECT_ROOT / 'mlruns' / 'x.journal'}"
    )
    assert resolve_storage_url(f"journal://{tmp_path}/a/s.journal") == f"journal:{tmp_path}/a/s.journal"
    assert (tmp_path / "a").is_dir()  # made, so that Optuna can write there
    assert resolve_storage_url("sqlite:///mlruns/o.db") == f"sqlite:///{PROJECT_ROOT / 'mlruns' / 'o.db'}"
    assert resolve_storage_url("sqlite:///:memory:") == "sqlite:///:memory:"
    assert resolve_storage_url("postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(UserError, match="is not a storage URL"):
        resolve_storage_url("mlruns/optuna.db")


def test_lock_files_sit_beside_local_storages_only(tmp_path):
    assert lock_path(f"journal:{tmp_path}/s.journal") == tmp_path / "s.journal.sweep-lock"
    assert lock_path(f"sqlite:///{tmp_path}/o.db") == tmp_path / "o.db.sweep-lock"
    assert lock_path("sqlite:///:memory:") is None
    assert lock_path("postgresql://u@h/db") is None


def test_redact_hides_the_password():
    assert "secret" not in redact("postgresql://u:secret@h/db")
    assert redact("journal:/x/y.journal") == "journal:/x/y.journal"


def test_a_storage_that_cannot_open_is_one_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot open the Optuna storage"):
        open_storage(f"sqlite:///{tmp_path}/missing/dir/o.db")


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_trial_numbers_find_the_trial_ids_in_creation_order(tmp_path, kind):
    """The sweeper takes a trial's id from its number (storage.get_trial_id_from_study_id_trial_number)
    and ranks trials by number: both rest on numbers following creation order, as ids do, also when two
    processes (two Study objects here) add trials to one study in turn."""
    url = f"journal:{tmp_path}/s.journal" if kind == "journal" else f"sqlite:///{tmp_path}/o.db"
    storage = open_storage(url)
    optuna.create_study(study_name="other", storage=storage).ask()  # ids are per storage, numbers per study
    first = optuna.create_study(study_name="s", storage=storage)
    second = optuna.load_study(study_name="s", storage=open_storage(url))
    asked = [study.ask() for study in (first, second, second, first)]
    study_id = storage.get_study_id_from_name("s")
    # _trial_id is Optuna's private id, read here only to check the public lookup against it
    assert [storage.get_trial_id_from_study_id_trial_number(study_id, t.number) for t in asked] == [
        t._trial_id for t in asked
    ]
    trials = first.get_trials(deepcopy=False)
    assert sorted(trials, key=lambda t: t.number) == sorted(trials, key=lambda t: t._trial_id)
    assert [t.number for t in asked] == [0, 1, 2, 3]
