"""bloodcell: a Hydra + Optuna + MLflow experiment framework for blood-cell image classifiers."""

import os
import sys
from pathlib import Path

# TensorFlow's C++ start-up chatter (CPU feature flags, oneDNN notices) hides the lines users need.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# ... and what Abseil prints before that level applies (an "E0000 failed call to cuInit" on every CPU-only
# run): filtered out of stderr while TensorFlow loads; real warnings and errors pass
# (bloodcell/core/tf_noise.py)
from bloodcell.core import tf_noise

tf_noise.install()

# MLflow's artifact transfer bars (tqdm) redraw with carriage returns: on a terminal only, not in a log file
if not (sys.stderr is not None and sys.stderr.isatty()):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

__version__ = "0.1.0"

#: Class ids, in this order everywhere (the competition's label order).
CLASS_NAMES: tuple[str, ...] = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)
NUM_CLASSES = len(CLASS_NAMES)

#: The repository root: conf/, sweeps/ and the default mlruns/ live here, whatever the CWD.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
