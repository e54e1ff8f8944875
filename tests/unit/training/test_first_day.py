"""Issue 16, items 6 and 9: what a new user meets first. Logs a file can hold (one line per epoch off a
terminal), no TensorFlow start-up noise, the preview written under outputs/, the key packages' versions
recorded on every run. (End to end: tests/e2e/test_first_day.py.)"""

from __future__ import annotations

import io
import os
import sys

import pytest

from bloodcell.core import tf_noise
from bloodcell.training.phases import keras_verbose


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_verbose_auto_is_a_bar_on_a_terminal_and_a_line_per_epoch_elsewhere():
    assert keras_verbose("auto", _Stream(tty=True)) == 1
    assert keras_verbose("auto", _Stream(tty=False)) == 2
    assert keras_verbose(None, _Stream(tty=False)) == 2
    assert keras_verbose(0, _Stream(tty=True)) == 0  # an explicit setting wins
    assert keras_verbose(1, _Stream(tty=False)) == 1


CPU_START = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796173592.572371   22934 port.cc:153] oneDNN custom operations are on. You may see ...
I0000 00:00:1796173592.573954   22934 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU ..
W0000 00:00:1796173592.600000   22934 some_op.cc:12] a real warning
/x/keras/src/y.py:3: UserWarning: a Python warning
  warnings.warn(
E0000 00:00:1796173605.202337   22934 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: ...
E0000 00:00:1796173605.300000   22934 other.cc:1] a real error
"""


def test_start_up_noise_goes_and_real_warnings_and_errors_stay():
    kept = tf_noise.filter_lines(CPU_START, level=2)
    assert kept.splitlines() == [
        "/x/keras/src/y.py:3: UserWarning: a Python warning",
        "  warnings.warn(",
        "E0000 00:00:1796173605.300000   22934 other.cc:1] a real error",
    ]
    # level 1 keeps warnings, as TensorFlow's own filter would
    assert "W0000 00:00:1796173592.600000   22934 some_op.cc:12] a real warning\n" in tf_noise.filter_lines(
        CPU_START, level=1
    )


def test_a_failed_cuinit_stays_when_a_cuda_driver_is_installed():
    with_driver = "".join(line for line in CPU_START.splitlines(keepends=True) if "cuda drivers" not in line)
    assert "failed call to cuInit" in tf_noise.filter_lines(with_driver, level=2)


def test_filtered_stderr_works_on_the_file_descriptor(capfd):
    with tf_noise.filtered_stderr(level=2):
        os.write(2, b"I0000 00:00:1.0 1 x.cc:1] noise\n")
        os.write(2, b"E0000 00:00:1.0 1 x.cc:2] kept\n")
        print("python line", file=sys.stderr)
    # (under capfd sys.stderr is pytest's own file, so only the set of lines is compared)
    assert set(capfd.readouterr().err.splitlines()) == {"E0000 00:00:1.0 1 x.cc:2] kept", "python line"}


def test_the_hook_waits_for_tensorflow_and_is_off_at_level_0(monkeypatch):
    finder = tf_noise._finder
    assert finder.find_spec("numpy", None) is None  # other imports are not touched
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.setattr(sys, "meta_path", [m for m in sys.meta_path if m is not finder])
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    tf_noise.install()
    assert finder not in sys.meta_path


def test_augment_preview_writes_under_outputs_by_default():
    from bloodcell.core.cli import compose

    cfg = compose(["+experiment=quickstart", "augmentation=heavy"], config_name="augment_preview")
    assert cfg.output == "outputs/augmentation_preview_heavy.png"  # git-ignored, not the repository root


def test_every_run_records_the_key_packages_versions():
    from importlib import metadata

    from bloodcell.tracking import version_tags

    tags = version_tags()
    assert tags["keras_version"] == metadata.version("keras")
    assert tags["keras_cv_version"] == metadata.version("keras-cv")
    assert {"tensorflow_version", "numpy_version", "mlflow_version", "optuna_version"} <= set(tags)
    assert tags["hydra_core_version"] == metadata.version("hydra-core")
    assert tags["python_version"].count(".") == 2


@pytest.mark.parametrize("name", ["keras", "mlflow", "optuna"])
def test_dependencies_stop_before_the_next_major_version(name):
    import tomllib
    from packaging.requirements import Requirement

    from bloodcell import PROJECT_ROOT

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    [req] = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == name]
    major = int(metadata_version(name).split(".")[0])
    assert not req.specifier.contains(f"{major + 1}.0")
    pins = (PROJECT_ROOT / "constraints.txt").read_text().splitlines()
    assert f"{name}=={metadata_version(name)}" in pins  # the tested version is the one installed here


def metadata_version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)
