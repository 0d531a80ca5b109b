"""The transformer units and blocks on TensorFlow (bodies: `tests/transformer_tests.py`)."""

from transformer_tests import *  # noqa: F401,F403
