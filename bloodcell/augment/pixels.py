"""The pixel range every augmentation stage takes and returns: a leaf that the stages, the mixers and the
pipeline all import (it lives apart so that none of them imports another for it, and none imports Keras)."""

VALUE_RANGE = (0.0, 255.0)
