"""Phase-1 reuse across runs (``trainer.reuse_phase1``): trials of a fine-tuning study that share phase 1
train it once.

A run's end-of-phase-1 state is decided by its data and split, seed, backbone, head, augmentation, trainer
settings and the code that trains; ``finetune.*`` plays no part in it. `phase1_key` hashes all of that. The
first run with a key trains phase 1 and stores the state it hands to phase 2 as an entry
``<checkpoint root>/phase1/<key>/epoch-<NNNN>/`` (`bloodcell.training.checkpoints`' format and atomic write: a
temporary folder renamed when complete): every variable of the model (phase 1's best weights already
restored by early stopping, the precise-BN statistics, in-model augmentation's random state), the
optimizer's variables, the input pipeline's random state, the phase-1 epoch history, its best
``val_accuracy``, the source run id and the seconds phase 1 took. A later run with the same key loads that
state instead of training, logs the copied epochs into its own MLflow run at the same steps, reports them to
its Optuna trial (the pruner sees what it would have seen) and starts phase 2 from the same state.

What is captured is the state after Keras' ``fit`` returned, i.e. at the phase boundary: early stopping's
counters and best weights belong to phase 1 and end with it (phase 2 starts a fresh early stopping and a
fresh optimizer), and ``restore_best_weights`` has already put the best epoch's weights in. So a reused run
and one that trains phase 1 enter phase 2 with equal variables (tests/e2e/test_phase1_reuse.py compares
their phase-2 metrics).

Concurrency: a `filelock.FileLock` per key (``phase1/<key>.lock``) is held while the entry is looked up
and, on a miss, while phase 1 trains and the entry is written. Parallel trials (joblib workers, several
sweep processes on one machine) with the same key therefore wait for the first instead of training the same
phase 1 alongside it: on shared cores a second identical training would only slow the first down, and the
waiting trial starts phase 2 no later than if it had trained. If the first run dies or is pruned in phase
1, the operating system drops its lock, no entry exists, and the next waiter trains. The lock is an
``fcntl`` lock: across machines it holds only where the file system honours it (local disks; many NFS
setups do not), so give each machine its own ``trainer.checkpoint.dir`` there; the atomic rename still
means no run ever reads a half-written entry.

Not reused (the run trains phase 1 as before): ``trainer.reuse_phase1=false``; a run with
``trainer.time_limit_minutes`` (its phase 1 ends by the wall clock, which no key can describe); a resumed
run (``trainer.resume``, a requeued trial: it continues its own checkpoint). Entries stay until deleted
(``rm -r mlruns/checkpoints/phase1``); one is the size of one checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from bloodcell import __version__
from bloodcell.core.settings import TrainerSchema
from bloodcell.training import checkpoints

if TYPE_CHECKING:
    from bloodcell.training.phases import RunCallbacks
    from bloodcell.training.setup import Setup

log = logging.getLogger("bloodcell.train")

#: the format of an entry; raising it invalidates every stored one
FORMAT = 1
#: the modules and packages whose source decides phase 1's end state, by import name (their text is part of
#: the key: an edit is a miss). Named, not found by path: a module that moves is still found, or fails loudly.
CODE = (
    "bloodcell.training.recipe",
    "bloodcell.training.setup",
    "bloodcell.training.phases",
    "bloodcell.training.callbacks",
    "bloodcell.training.checkpoints",
    "bloodcell.training.run_data",
    "bloodcell.models",
    "bloodcell.augment",
    "bloodcell.data",
)
#: config keys that do not change phase 1's end state: phase 2, where the run is recorded, what happens
#: after training. Every other key is in the key, so a key added later errs on the side of a miss.
NOT_IN_KEY = ("finetune", "tracking", "trial", "objective")
TRAINER_NOT_IN_KEY = ("resume", "verbose", "checkpoint", "reuse_phase1", "test_tta", "calibrate")
#: the data set's identity is its content fingerprint (in the data tags), not where the file lies
DATA_NOT_IN_KEY = ("path", "strict")
#: copied epochs keep their metrics, not the source run's training throughput (this run trained nothing)
NOT_COPIED = ("time/train_images_per_second",)


def enabled(trainer: TrainerSchema) -> bool:
    """``trainer.reuse_phase1``, unless a time limit makes phase 1's end depend on the wall clock."""
    return trainer.reuse_phase1 and not trainer.time_limit_minutes


def code_digest(names: tuple[str, ...] = CODE) -> str:
    """sha256 over the source of the named modules (a package: every module in it), each under its import
    name, in name order. Found by `importlib.util.find_spec`, so nothing is imported; a name that no longer
    exists raises instead of silently hashing less."""
    import importlib.util

    sources: dict[str, Path] = {}
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"phase-1 cache: no module {name} to key on (CODE is out of date)")
        origin = Path(spec.origin)
        if spec.submodule_search_locations:  # a package: all of its modules
            for file in origin.parent.rglob("*.py"):
                parts = file.relative_to(origin.parent).with_suffix("").parts
                module = ".".join((name, *parts)).removesuffix(".__init__")
                sources[module] = file
        else:
            sources[name] = origin
    digest = hashlib.sha256()
    for module in sorted(sources):
        digest.update(module.encode())
        digest.update(sources[module].read_bytes())
    return digest.hexdigest()


def key_parts(cfg: Any, data_tags: dict[str, str], replicas: int = 1) -> dict[str, Any]:
    """Everything the key hashes: the resolved config less `NOT_IN_KEY` (and the trainer and data keys
    that do not train), the data and split fingerprints (``RunData.tags()``, less the source's name), the
    number of replicas (the global batch), and the versions of bloodcell, TensorFlow, Keras and the code."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    config = {k: v for k, v in plain.items() if k not in NOT_IN_KEY}
    config["trainer"] = {k: v for k, v in config["trainer"].items() if k not in TRAINER_NOT_IN_KEY}
    config["data"] = {k: v for k, v in config["data"].items() if k not in DATA_NOT_IN_KEY}
    if not config["data"]["clean"]:
        config.pop("cleaning", None)  # unused without data.clean
    versions = {"bloodcell": __version__, "code": code_digest()}
    for package in ("tensorflow", "keras"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "format": FORMAT,
        "config": config,
        "data": {k: v for k, v in data_tags.items() if k != "data_source"},
        "replicas": int(replicas),
        "versions": versions,
    }


def phase1_key(cfg: Any, data_tags: dict[str, str], replicas: int = 1) -> str:
    """The hex key of a run's phase 1 (`key_parts`, hashed); 24 hex digits name the entry's folder."""
    text = json.dumps(key_parts(cfg, data_tags, replicas), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class Entry:
    """A stored end of phase 1 (a `checkpoints.Checkpoint` whose state also names its source)."""

    saved: checkpoints.Checkpoint

    @property
    def source_run(self) -> str:
        return str(self.saved.state["source_run"])

    @property
    def epochs(self) -> int:
        return int(self.saved.state["phase1_epochs"])

    @property
    def seconds(self) -> float:
        return float(self.saved.state["seconds"])

    @property
    def history(self) -> list[dict[str, float]]:
        return list(self.saved.state["history"])


@dataclass
class Phase1Cache:
    """Where one run's phase-1 entry lives (``<root>/phase1/<key>``) and which run this is."""

    root: Path
    key: str
    run_id: str

    @property
    def folder(self) -> Path:
        return self.root / "phase1" / self.key

    def load(self) -> Entry | None:
        saved = checkpoints.latest(self.folder)
        return Entry(saved) if saved is not None else None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The key's lock; says so when another run holds it (it is training this phase 1)."""
        from filelock import FileLock, Timeout

        self.folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.folder) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("phase 1 %s: another run is training it; waiting for its entry", self.key)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def store(self, setup: Setup, callbacks: RunCallbacks, epochs: int, seconds: float) -> Path:
        model = setup.trainable_model
        history = callbacks.epoch_log.history[:epochs]
        state = {
            "epoch": epochs - 1,
            "phase": "phase1",
            "phase1_epochs": epochs,
            "phase1_best": max(h.get("val_accuracy", float("-inf")) for h in history) if history else None,
            "history": history,
            "source_run": self.run_id,
            "seconds": seconds,
            "created": time.time(),
        }
        arrays = {
            "variables": [v.numpy() for v in model.variables],
            "optimizer": [v.numpy() for v in model.optimizer.variables],
            "random": [v.numpy() for layer in setup.random_layers for v in layer.variables],
        }
        return checkpoints.save(self.folder, checkpoints.Checkpoint(state, arrays))


def for_run(
    cfg: Any, trainer: TrainerSchema, data_tags: dict[str, str], root: Path, replicas: int, run_id: str
) -> Phase1Cache | None:
    """The run's cache slot (keyed on its whole config, ``cfg``: `key_parts`), or None when reuse is off
    for it (`enabled`: its ``trainer`` settings)."""
    if not enabled(trainer):
        return None
    return Phase1Cache(root, phase1_key(cfg, data_tags, replicas), run_id)


def restore(setup: Setup, entry: Entry) -> bool:
    """Put the entry's variables into the model, its optimizer (built first) and the pipeline's random
    layers; False (nothing changed) when they do not fit this model."""
    model = setup.trainable_model
    with setup.strategy.scope():
        model.optimizer.build(model.trainable_variables)
    parts = [
        (model.variables, entry.saved.arrays.get("variables", [])),
        (model.optimizer.variables, entry.saved.arrays.get("optimizer", [])),
        ([v for layer in setup.random_layers for v in layer.variables], entry.saved.arrays.get("random", [])),
    ]
    if any(
        len(variables) != len(values) or any(v.shape != a.shape for v, a in zip(variables, values))
        for variables, values in parts
    ):
        return False
    for variables, values in parts:
        for variable, value in zip(variables, values):
            variable.assign(value)
    return True


def replay(callbacks: RunCallbacks, entry: Entry) -> None:
    """The entry's epochs into this run: MLflow at their steps, the Optuna trial's reports (the pruner may
    stop the trial here, at the step where it would have stopped a trial that trained them), tags."""
    for record in entry.history:
        callbacks.epoch_log.record({k: v for k, v in record.items() if k not in NOT_COPIED})
        if callbacks.pruner is not None:
            callbacks.pruner.replay(record)
    callbacks.recorder.set_tags({"phase1_reused": "true", "phase1_source_run": entry.source_run})
    callbacks.recorder.log_metrics(
        {"phase1_reused_epochs": entry.epochs, "phase1_saved_seconds": entry.seconds}
    )
    if callbacks.pruner is not None:  # the sweeper's summary counts them
        callbacks.pruner.trial.set_user_attr("phase1_reused_epochs", entry.epochs)
        callbacks.pruner.trial.set_user_attr("phase1_saved_seconds", entry.seconds)


def train_or_reuse(
    cache: Phase1Cache,
    setup: Setup,
    callbacks: RunCallbacks,
    prepare: Callable[[], None],
    train_phase1: Callable[[], int],
) -> int:
    """Phase 1 from the cache when its entry exists, else trained (``train_phase1``) and stored; returns
    the global epoch after phase 1. ``prepare`` compiles the model for phase 1 (the optimizer the entry's
    state goes into)."""
    with cache.locked():
        entry = cache.load()
        if entry is not None:
            prepare()
            if restore(setup, entry):
                log.info(
                    "phase 1: reused from run %s (%d epochs, %.0f s not trained; key %s)",
                    entry.source_run,
                    entry.epochs,
                    entry.seconds,
                    cache.key,
                )
                callbacks.recorder.set_tags({"phase1_key": cache.key})
                replay(callbacks, entry)
                return entry.epochs
            log.warning("phase 1 entry %s does not fit this model; training phase 1", cache.folder)
        callbacks.recorder.set_tags({"phase1_reused": "false", "phase1_key": cache.key})
        started = time.perf_counter()
        epochs = train_phase1()
        if callbacks.out_of_time():
            return epochs
        try:
            cache.store(setup, callbacks, epochs, time.perf_counter() - started)
        except OSError as err:  # a full disk must not end a run that could still finish
            log.warning("phase 1 entry %s not written (%s); training goes on", cache.folder, err)
        return epochs
