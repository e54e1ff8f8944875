"""bloodcell: a Hydra + Optuna + MLflow experiment framework for blood-cell image classifiers."""

import os
from pathlib import Path

# TensorFlow's C++ start-up chatter (CPU feature flags, oneDNN notices) hides the lines users need.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
