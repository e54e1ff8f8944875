"""What resume saves: a training run killed (SIGKILL) at about half its epochs, then continued with
`trainer.resume=auto` in the same MLflow run, against starting it again from epoch 0.

    python benchmarks/resume_savings.py                                  # the quickstart demo, 10 + 6 epochs
    python benchmarks/resume_savings.py +experiment=mobilenet_cpu data.limit=3000 trainer.epochs=6 ...

Prints, for both ways of going on after the kill: epochs trained after the kill, wall seconds of the
second process, the final val/test accuracy (they must agree: a resumed run equals an uninterrupted one on
the same machine). Everything goes to a fresh store under benchmarks/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = [
    "+experiment=quickstart",
    "trainer.epochs=10",
    "finetune.epochs=6",
    "trainer.early_stopping_patience=100",
    "finetune.early_stopping_patience=100",
    "tracking.log_model=false",
]


def train(overrides: list[str], store: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = [*overrides, f"tracking.uri=sqlite:///{store / 'mlflow.db'}", "trainer.verbose=0", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "bloodcell.train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_at(proc: subprocess.Popen, checkpoints: Path, epoch: int) -> int:
    """SIGKILL once a checkpoint of ``epoch`` (or later) exists; returns the checkpoint's epoch."""
    while proc.poll() is None:
        for state in checkpoints.glob("*/epoch-*/state.json"):
            try:
                saved = json.loads(state.read_text())["epoch"]
            except (OSError, ValueError):
                continue
            if saved >= epoch:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return int(saved)
        time.sleep(0.05)
    raise SystemExit(
        f"the run ended (exit {proc.returncode}) before epoch {epoch}: {proc.stderr.read()[-2000:]}"
    )


def finish(proc: subprocess.Popen) -> float:
    tic = time.perf_counter()
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"training failed: {err[-3000:]}")
    return time.perf_counter() - tic


def outcome(store: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    epochs = len(client.get_metric_history(run.info.run_id, "val_accuracy"))
    return {
        "epochs": epochs,
        "val": run.data.metrics["val_accuracy"],
        "test": run.data.metrics["test_accuracy"],
        "resumed_after": int(run.data.tags.get("resumed_after_epoch", -1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help=f"train overrides (default: {' '.join(DEFAULT)})")
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of all epochs before the kill")
    args = parser.parse_args()
    overrides = args.overrides or DEFAULT
    out = ROOT / "benchmarks" / "results" / f"resume_{time.strftime('%Y%m%d-%H%M%S')}"

    from bloodcell.core.cli import compose

    cfg = compose(overrides)
    total = int(cfg.trainer.epochs) + int(cfg.finetune.epochs)
    kill_epoch = max(int(total * args.kill_at) - 1, 0)

    resumed_store, restart_store = out / "resume", out / "restart"
    first = train(overrides, resumed_store)
    saved = kill_at(first, resumed_store / "checkpoints", kill_epoch)
    resume_seconds = finish(train(overrides, resumed_store, "trainer.resume=auto"))
    restart_seconds = finish(train(overrides, restart_store))
    resumed, restarted = outcome(resumed_store), outcome(restart_store)

    print(f"{total} epochs in all; killed after the checkpoint of epoch {saved + 1} ({out})")
    print(f"{'after the kill':<16}{'epochs trained':>16}{'wall s':>10}{'val acc':>10}{'test acc':>10}")
    print(
        f"{'resume':<16}{resumed['epochs'] - saved - 1:>16}{resume_seconds:>10.1f}"
        f"{resumed['val']:>10.4f}{resumed['test']:>10.4f}"
    )
    print(
        f"{'restart':<16}{restarted['epochs']:>16}{restart_seconds:>10.1f}"
        f"{restarted['val']:>10.4f}{restarted['test']:>10.4f}"
    )
    same = abs(resumed["test"] - restarted["test"]) < 1e-9 and abs(resumed["val"] - restarted["val"]) < 1e-9
    print(
        f"epochs retrained: resume {resumed['epochs'] - saved - 1} of {total} "
        f"({saved + 1} kept), restart {restarted['epochs']}; same final model: {'yes' if same else 'NO'}"
    )


if __name__ == "__main__":
    main()
