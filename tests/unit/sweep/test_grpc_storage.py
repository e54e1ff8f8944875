"""`grpc://host:port` storages (Optuna's gRPC storage proxy, issue 16 item 8): URLs, and one error line
when no proxy answers. Two sweeps through a running proxy: tests/e2e/test_grpc_proxy.py."""

from __future__ import annotations

import pytest

from bloodcell.core.errors import UserError
from bloodcell.sweep import trial
from bloodcell.sweep.trial import grpc_address, lock_path, open_storage, redact, resolve_storage_url


def test_grpc_urls_pass_through_with_host_and_port():
    assert resolve_storage_url("grpc://proxy-host:13000") == "grpc://proxy-host:13000"
    assert grpc_address("grpc://proxy-host:13000") == ("proxy-host", 13000)
    assert grpc_address("grpc://127.0.0.1:5/") == ("127.0.0.1", 5)
    assert lock_path("grpc://proxy-host:13000") is None  # no shared file: the sweeper ranks its trials
    assert redact("grpc://proxy-host:13000") == "grpc://proxy-host:13000"


@pytest.mark.parametrize("url", ["grpc://proxy-host", "grpc://:13000", "grpc://h:port", "grpc://h:1/db"])
def test_a_grpc_url_without_host_and_port_is_one_user_error(url):
    with pytest.raises(UserError, match="is not grpc://host:port"):
        resolve_storage_url(url)


def test_no_proxy_answering_is_one_user_error(monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(trial, "GRPC_CONNECT_TIMEOUT", 0.5)
    with pytest.raises(UserError, match="no Optuna storage proxy answers.*bloodcell.storage_proxy"):
        open_storage(f"grpc://127.0.0.1:{port}")
