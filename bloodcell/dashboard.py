"""`python -m bloodcell.dashboard`: optuna-dashboard on the Optuna storage of a sweep, found the way the
sweeper finds it (``storage`` as ``hydra.sweeper.storage`` is written; null = mlruns/optuna.journal).

    python -m bloodcell.dashboard                         # then open http://127.0.0.1:8080
    python -m bloodcell.dashboard storage=sqlite:///mlruns/optuna.db port=8081

Each trial there carries its MLflow run (user attributes ``mlflow_run_id`` and ``mlflow_run_url``, set by
the sweeper); each MLflow trial run carries its study and trial number (tags ``optuna_study``,
``trial_number``): from either side to the other.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import hydra
from omegaconf import DictConfig

from bloodcell import PROJECT_ROOT
from bloodcell.core.cli import run_or_exit
from bloodcell.core.errors import UserError


def dashboard(cfg: DictConfig) -> None:
    """Serve optuna-dashboard on ``cfg.storage`` at ``cfg.host``:``cfg.port`` until interrupted."""
    from bloodcell.sweep.trial import open_storage, redact, resolve_storage_url

    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise UserError('optuna-dashboard is not installed: pip install -e ".[dashboard]"') from None
    url = resolve_storage_url(cfg.storage)
    local = next((url[len(p) :] for p in ("journal:", "sqlite:///") if url.startswith(p)), None)
    if local is not None and local != ":memory:" and not Path(local).is_file():
        # opening it would create an empty study storage: say what to do instead
        raise UserError(
            f"no Optuna storage at {redact(url)}: run a sweep first "
            "(python -m bloodcell.train -m +sweeps=quick) or pass storage=<its hydra.sweeper.storage>"
        )
    storage = open_storage(url)
    # SIGTERM ends it at once: wsgiref swallows an exception raised while it serves a request, and the
    # dashboard has nothing to save (the storage is a database or an append-only journal)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))
    print(f"optuna-dashboard on {redact(url)}: http://{cfg.host}:{cfg.port} (Ctrl-C stops it)", flush=True)
    run_server(storage, host=str(cfg.host), port=int(cfg.port))


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="dashboard")
def main(cfg: DictConfig) -> None:
    run_or_exit(dashboard, cfg)


if __name__ == "__main__":
    main()
