"""Secrets masked in every record (bloodcell.core.redaction), and the sweeper forwarding a password to its
trials as an environment-variable reference instead of the value. No subprocess, no training."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from bloodcell.core.redaction import has_secret, mask_secrets, mask_text, mask_url
from bloodcell.sweep.trial import redact
from hydra_plugins.bloodcell_optuna_sweeper._impl import _forward_secret, _quote


@pytest.mark.parametrize(
    "url, masked",
    [
        ("postgresql://u:secret@host/db", "postgresql://u:***@host/db"),
        ("postgresql+psycopg://u:p%40ss@h:5432/db?sslmode=require", "postgresql+psycopg://u:***@h:5432/db?sslmode=require"),
        ("mysql+pymysql://u:p@ss@h/db", "mysql+pymysql://u:***@h/db"),  # an unescaped @ in the password
        ("https://host/x?token=abc&page=2", "https://host/x?token=***&page=2"),
        ("s3://b/k?X-Amz-Signature=abc&X-Amz-Credential=def", "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("postgresql://optuna@db/optuna", "postgresql://optuna@db/optuna"),  # a user name is no secret
        ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
        ("journal:/x/y.journal", "journal:/x/y.journal"),
        ("${oc.env:OPTUNA_URL}", "${oc.env:OPTUNA_URL}"),
    ],
)  # fmt: skip
def test_mask_url_hides_passwords_and_tokens_only(url, masked):
    assert mask_url(url) == masked
    assert has_secret(url) == (url != masked)


def test_redact_is_mask_url():
    assert redact("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"


def test_urls_inside_text_and_structures_are_masked():
    line = "++trial.storage='postgresql://u:pw1@h/db' tracking.uri=mysql://v:pw2@h/x failed"
    assert (
        mask_text(line) == "++trial.storage='postgresql://u:***@h/db' tracking.uri=mysql://v:***@h/x failed"
    )
    cfg = {"tracking": {"uri": "postgresql://u:pw@h/db"}, "n": 3, "hooks": ["https://h/?api_key=k"]}
    assert mask_secrets(cfg) == {
        "tracking": {"uri": "postgresql://u:***@h/db"},
        "n": 3,
        "hooks": ["https://h/?api_key=***"],
    }


def test_every_url_of_an_override_list_joined_by_commas_is_masked():
    """Hydra's hydra.job.override_dirname joins a job's overrides with commas: one URL runs into the next."""
    joined = (
        "+backup_url=postgresql://b:pw1@localhost/db,seed=1,tracking.uri=http://alice:pw2@127.0.0.1:5000,x=1"
    )
    assert mask_text(joined) == (
        "+backup_url=postgresql://b:***@localhost/db,seed=1,tracking.uri=http://alice:***@127.0.0.1:5000,x=1"
    )
    assert (
        mask_text("https://h/login?next=https://u:pw@other/x") == "https://h/login?next=https://u:***@other/x"
    )


def test_the_sweeper_forwards_a_password_as_an_environment_reference(monkeypatch):
    url = "postgresql://u:it's-secret@db/optuna"
    monkeypatch.delenv("BLOODCELL_SECRET_TRIAL_STORAGE", raising=False)
    forwarded = _forward_secret(f"++trial.storage={_quote(url)}")
    assert forwarded == "++trial.storage=${oc.env:BLOODCELL_SECRET_TRIAL_STORAGE}"
    assert os.environ["BLOODCELL_SECRET_TRIAL_STORAGE"] == url
    monkeypatch.delenv("BLOODCELL_SECRET_TRIAL_STORAGE")
    # what the trial's config resolves it to: the real URL, in that process only
    monkeypatch.setenv("BLOODCELL_SECRET_TRIAL_STORAGE", url)
    assert OmegaConf.create({"storage": forwarded.split("=", 1)[1]}).storage == url
    plain = "tracking.uri=http://mlflow:5000"
    assert _forward_secret(plain) == plain
    assert _forward_secret("tracking.uri=${oc.env:MLFLOW_URI}") == "tracking.uri=${oc.env:MLFLOW_URI}"
