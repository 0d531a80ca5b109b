"""keras_blpa.layers.MultiHeadAttention on TensorFlow (bodies: `tests/mha_tests.py`)."""

from mha_tests import *  # noqa: F401,F403
