"""`python -m bloodcell.storage_proxy`: serve an Optuna study database through Optuna's gRPC storage proxy.

    python -m bloodcell.storage_proxy storage=postgresql://user:pw@db-host/optuna host=0.0.0.0 port=13000
    python -m bloodcell.train -m +sweeps=quick hydra.sweeper.storage=grpc://proxy-host:13000

Every sweep process and every trial then talks to this one process (``optuna.storages.GrpcStorageProxy``),
which holds the database connections and caches the study (``optuna.storages.get_storage``), instead of
each worker opening its own: what lets hundreds to thousands of workers share one PostgreSQL study.
Optuna's proxy cannot serve a journal file, and marks itself experimental (since Optuna 4.2).
"""

from __future__ import annotations

import warnings
from typing import Any

import hydra
from omegaconf import DictConfig

from bloodcell import PROJECT_ROOT
from bloodcell.core.cli import run_or_exit
from bloodcell.core.errors import UserError


def serve(cfg: DictConfig) -> None:
    """Open ``cfg.storage`` and serve it on ``cfg.host:cfg.port`` until stopped."""
    from concurrent.futures import ThreadPoolExecutor

    import optuna
    from optuna.exceptions import ExperimentalWarning

    from bloodcell.sweep.trial import open_storage, redact, resolve_storage_url

    url = resolve_storage_url(cfg.storage)
    if url.startswith(("journal:", "grpc://")):
        raise UserError(
            f"storage={cfg.storage}: the proxy serves a database (postgresql://..., mysql+pymysql://..., "
            "sqlite:///<file>.db), not a journal file or another proxy"
        )
    port, threads = int(cfg.port), int(cfg.threads)
    if not 0 < port < 65536 or threads < 1:
        raise UserError(f"port={cfg.port} must be 1-65535 and threads={cfg.threads} at least 1")
    _check_port_free(str(cfg.host), port)
    # get_storage wraps the database in Optuna's in-process cache, as run_grpc_proxy_server's docs ask
    storage: Any = optuna.storages.get_storage(open_storage(url))
    print(
        f"serving the Optuna storage {redact(url)} on grpc://{cfg.host}:{port} "
        f"(sweeps: hydra.sweeper.storage=grpc://<this host>:{port}); Ctrl-C stops",
        flush=True,
    )
    with warnings.catch_warnings():  # "experimental": said in the docstring and docs/sweeps.md
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            optuna.storages.run_grpc_proxy_server(
                storage, host=str(cfg.host), port=port, thread_pool=ThreadPoolExecutor(max_workers=threads)
            )
        except RuntimeError as err:  # grpc: "Failed to bind to address ..."
            raise UserError(f"cannot listen on {cfg.host}:{port} ({err}); is the port taken?") from None


def _check_port_free(host: str, port: int) -> None:
    """gRPC binds with SO_REUSEPORT, so a second server on a taken port would start and share it silently;
    a plain bind says whether the port is free."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise UserError(f"host={host}: {err}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as err:
            raise UserError(
                f"cannot listen on {host}:{port} ({err.strerror}); choose another port="
            ) from None


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="storage_proxy")
def main(cfg: DictConfig) -> None:
    try:
        run_or_exit(serve, cfg)
    except KeyboardInterrupt:
        print("storage proxy stopped")


if __name__ == "__main__":
    main()
